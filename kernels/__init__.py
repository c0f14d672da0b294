"""Triton kernels, each beside its pure-torch ``_ref`` twin, and the custom ops that pick one.

    ssd_scan.py   chunked SSD scan (prefill): ssd_scan, ssd_scan_ref
    ssd_states.py the states entering its chunks (the scan's first launches)
    ssd_step.py   fused Mamba2 decode step (conv + SSM): ssd_step, ssd_step_ref
    ops.py        torch.ops.edgeseq.ssd_scan / ssd_step: the kernel on CUDA, the twin elsewhere
    aot.py        the TensorRT plugins' entry kernels compiled to PTX, and launched with the driver

Importing the package registers the ops. It imports without Triton (the optional
``kernels`` extra); the ops then always run their twins.
"""

from edgeseq.kernels import ops

__all__ = ["ops"]
