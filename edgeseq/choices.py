"""Every closed list a user picks from, named once: precisions, graph flavors, int8
presets, checkpoint formats, runtimes, reference devices.

Plain data that imports nothing, so the CLI, the target profiles and ``edgeseq run`` read
it without torch or onnx. The code that implements a choice is checked against this
module rather than copied into it: the checkpoint-family registry refuses a name missing
from ``FORMATS``, and the tests hold every shipped profile, graph flavor and tolerance
table to these lists.
"""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "int8", "int4")  # most faithful first; the state stays fp32 at every one

# ONNX graph flavors (``export.flavors``); a bundle carries one or more.
FLAVORS = ("portable", "opset27", "tensorrt", "contrib")
# Which runtime runs which flavor is a table beside the runners: ``edgeseq.deploy.runtimes``.

# int8 per instruction set. On onnxruntime every ISA preset makes the same graphs:
# MatMulNBits with 8-bit weight blocks and int8 activations (``edgeseq.export.quantize``),
# whose kernels onnxruntime picks for the CPU it runs on (VNNI, AVX-512, AVX2, ARM dot
# product); the name records what the target has. TensorRT reads weight-only Q/DQ instead.
INT8_PRESETS = {
    "arm64": {"form": "MatMulNBits"},
    "avx2": {"form": "MatMulNBits"},
    "avx512": {"form": "MatMulNBits"},
    "avx512_vnni": {"form": "MatMulNBits"},
    "qdq-weight-only": {"form": "QDQ"},  # TensorRT: DequantizeLinear(int8 weight) -> MatMul
}

# Checkpoint families (``edgeseq.families``), by their registered names.
FORMATS = ("hf", "hf_bamba", "hf_falcon_h1", "hf_granite_hybrid", "hf_nemotron_h", "mamba_ssm", "native")
WRITABLE_FORMATS = ("hf", "native")  # families with ``writable = True``

RUNTIMES = ("onnxruntime", "tensorrt")  # what a target profile's runtime.name may say
DEVICES = ("auto", "cpu", "cuda")  # where the PyTorch reference runs during validation
