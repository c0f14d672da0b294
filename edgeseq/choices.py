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
FLAVORS = ("portable", "opset27", "tensorrt")
# Which runtime runs which flavor is a table beside the runners: ``edgeseq.deploy.runtimes``.

# int8 settings per instruction set, after the presets optimum ships for onnxruntime
# (arm64, avx2, avx512, avx512_vnni): int8 symmetric per-channel weights everywhere; on
# AVX2 without VNNI the u8 x s8 product can saturate its 16-bit accumulator, so weights
# keep 7 bits (reduce_range).
INT8_PRESETS = {
    "arm64": {"per_channel": True, "reduce_range": False},
    "avx2": {"per_channel": True, "reduce_range": True},
    "avx512": {"per_channel": True, "reduce_range": False},
    "avx512_vnni": {"per_channel": True, "reduce_range": False},
    "qdq-weight-only": {},  # TensorRT: DequantizeLinear(int8 weight) -> MatMul
}

# Checkpoint families (``edgeseq.families``), by their registered names.
FORMATS = ("hf", "hf_bamba", "hf_falcon_h1", "hf_granite_hybrid", "hf_nemotron_h", "mamba_ssm", "native")
WRITABLE_FORMATS = ("hf", "native")  # families with ``writable = True``

RUNTIMES = ("onnxruntime", "tensorrt")  # what a target profile's runtime.name may say
DEVICES = ("auto", "cpu", "cuda")  # where the PyTorch reference runs during validation
