"""The kernels as ``torch.library`` custom ops: ``edgeseq::ssd_scan`` and ``edgeseq::ssd_step``.

Each op runs its Triton kernel on CUDA tensors and its ``_ref`` twin otherwise, so a
graph that calls the op runs anywhere. ``EDGESEQ_KERNELS_ON_CPU=1`` together with
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors through Triton's interpreter (for
tests). The fake (meta) implementations give torch.compile and export the output shapes.
fp64 inputs always take the twin: the kernels compute in fp32.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from edgeseq.kernels import ssd_scan as _scan
from edgeseq.kernels import ssd_step as _step
from edgeseq.kernels._triton import HAS_TRITON, interpreting

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_kernel(*tensors: Tensor) -> bool:
    """Whether tensors like these go to the Triton kernels (else to the ``_ref`` twins)."""
    if not HAS_TRITON or any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        return False
    if tensors[0].is_cuda:
        return True
    return interpreting() and os.environ.get("EDGESEQ_KERNELS_ON_CPU", "0") == "1"


@torch.library.custom_op("edgeseq::ssd_scan", mutates_args=())
def ssd_scan(
    X: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan; see ``edgeseq.kernels.ssd_scan.ssd_scan`` for shapes.
    Returns Y (b, l, h, p) in X's dtype and the final state (b, h, n, p) in fp32 (fp64 for fp64 X)."""
    run = _scan.ssd_scan if use_kernel(X, B, C) else _scan.ssd_scan_ref
    return run(X, dt, A, B, C, chunk_size, D, initial_state)


@ssd_scan.register_fake
def _(X, dt, A, B, C, chunk_size, D=None, initial_state=None):
    b, l, h, p = X.shape
    state_dtype = torch.promote_types(X.dtype, torch.float32)
    return X.new_empty(b, l, h, p), X.new_empty(b, h, B.shape[-1], p, dtype=state_dtype)


@torch.library.custom_op("edgeseq::ssd_step", mutates_args=())
def ssd_step(
    xBC: Tensor,
    dt: Tensor,
    conv_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    dt_bias: Tensor,
    A: Tensor,
    D: Tensor | None,
    ssm_state: Tensor,
    ngroups: int,
    dt_min: float,
    dt_max: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Mamba2 decode step of the SSM part; see ``edgeseq.kernels.ssd_step.ssd_step``.
    ``(dt_min, dt_max)`` is the config's dt_limit (dt_max may be inf). Returns y (b, h, p), the
    new conv state and the new ssm state; inputs are not modified."""
    fast = use_kernel(ssm_state, xBC) and ssm_state.dtype == torch.float32
    run = _step.ssd_step if fast else _step.ssd_step_ref
    return run(xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A, D, ssm_state, ngroups, dt_min, dt_max)


@ssd_step.register_fake
def _(xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A, D, ssm_state, ngroups, dt_min, dt_max):
    b, h, n, p = ssm_state.shape
    return ssm_state.new_empty(b, h, p), conv_state.new_empty(conv_state.shape), ssm_state.new_empty(b, h, n, p)
