"""The reference math: the one place edgeseq's numerics are defined.

Pure torch, any float dtype (fp64 for the property tests). Every kernel, exported graph
and runtime is tested against these functions. Imports nothing from kernels, export or
runtimes.
"""

from edgeseq.reference.attention import attention_prefill_ref, attention_step_ref, ring_positions, token_positions
from edgeseq.reference.layers import (
    causal_conv1d_ref,
    causal_conv1d_step_ref,
    gate_ref,
    gated_mlp_ref,
    gated_rmsnorm_ref,
    pads_first,
    relu2_mlp_ref,
    rmsnorm_ref,
    rope_ref,
)
from edgeseq.reference.moe import moe_experts_ref, moe_ref, moe_route_ref
from edgeseq.reference.ssd import segsum, ssd_scan_ref, ssd_sequential_ref, ssd_step_ref

__all__ = [
    "attention_prefill_ref",
    "attention_step_ref",
    "causal_conv1d_ref",
    "causal_conv1d_step_ref",
    "gate_ref",
    "gated_mlp_ref",
    "gated_rmsnorm_ref",
    "moe_experts_ref",
    "moe_ref",
    "moe_route_ref",
    "pads_first",
    "relu2_mlp_ref",
    "ring_positions",
    "rmsnorm_ref",
    "rope_ref",
    "segsum",
    "ssd_scan_ref",
    "ssd_sequential_ref",
    "ssd_step_ref",
    "token_positions",
]
