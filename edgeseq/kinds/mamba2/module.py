"""The Mamba2 mixer as a torch module: in_proj -> causal conv -> SSD -> gated RMSNorm -> out_proj.

The block hands every call the parameters at the width it runs (``p``, sliced through the
kind's ``weight_index``), so the module itself holds the full-width weights only.
``kernels`` routes the scan and step through the custom ops ``torch.ops.edgeseq.ssd_scan``
/ ``ssd_step`` (Triton on CUDA, the ``_ref`` twins elsewhere); a bf16/fp16 model then
feeds the scan X, B and C in its own dtype, the state staying fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeseq.reference import (
    causal_conv1d_ref,
    causal_conv1d_step_ref,
    gate_ref,
    gated_rmsnorm_ref,
    ssd_scan_ref,
    ssd_step_ref,
)

State = dict[str, Tensor]  # "conv" (b, conv_channels, d_conv-1), "ssm" (b, h, n, p)


class GatedNorm(nn.Module):
    """Holds the gated RMSNorm's weight (named ``norm.weight`` as in the checkpoints)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class Mamba2Mixer(nn.Module):
    def __init__(self, config, heads: int):
        super().__init__()
        m = config.mamba
        self.n_heads, self.ngroups, self.headdim, self.d_state = heads, m.ngroups, m.headdim, m.d_state
        self.chunk_size, self.dt_limit, self.eps = m.chunk_size, m.dt_limit, config.norm_eps
        d_inner, bc = self.n_heads * m.headdim, 2 * m.ngroups * m.d_state
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner + bc + self.n_heads, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(d_inner + bc, d_inner + bc, m.d_conv, groups=d_inner + bc, bias=m.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.rmsnorm = m.rmsnorm
        if m.rmsnorm:
            self.norm = GatedNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=m.proj_bias)
        self.kernels = False  # NestedLM.use_kernels: the custom ops instead of the reference calls
        self._init_ssm(m.dt_min, m.dt_max)

    def _init_ssm(self, dt_min: float, dt_max: float) -> None:
        # dt log-uniform in [dt_min, dt_max]; dt_bias is its softplus inverse (mamba_ssm's init)
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))

    def _project(self, p: dict[str, Tensor], u: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
        zxbcdt = F.linear(u, p["in_proj.weight"], p.get("in_proj.bias"))
        d_inner = heads * self.headdim
        return zxbcdt.split([d_inner, zxbcdt.size(-1) - d_inner - heads, heads], dim=-1)  # z, xBC, dt

    def _ssm_inputs(self, p: dict[str, Tensor], xBC: Tensor, dt: Tensor, heads: int):
        d_inner, gn = heads * self.headdim, self.ngroups * self.d_state
        x, B, C = xBC.split([d_inner, gn, gn], dim=-1)
        dt = F.softplus(dt + p["dt_bias"].to(dt.dtype)).clamp(*self.dt_limit)
        A = -torch.exp(p["A_log"].to(dt.dtype))
        return x, B, C, dt, A

    def _output(self, p: dict[str, Tensor], y: Tensor, z: Tensor, out_dtype: torch.dtype) -> Tensor:
        if self.rmsnorm:
            y = gated_rmsnorm_ref(y, z, p["norm.weight"], self.eps, group_size=y.size(-1) // self.ngroups)
        else:  # the gate alone (Falcon-H1's mamba_rms_norm=False)
            y = gate_ref(y, z)
        return F.linear(y.to(out_dtype), p["out_proj.weight"], p.get("out_proj.bias"))

    def forward(self, p: dict[str, Tensor], u: Tensor, state: State, position: Tensor, kept: int,
                mask: Tensor | None = None):  # fmt: skip
        """u (b, l, d) -> (b, l, d), new state; a whole prompt through the chunked scan.
        mask (b, l) or None: 0 marks a left pad, which leaves the conv and SSM state as they
        were (the conv skips it, its dt is 0) and whose output is meaningless."""
        b, l, _ = u.shape
        z, xBC, dt = self._project(p, u, kept)
        sd = state["ssm"].dtype
        xBC, conv = causal_conv1d_ref(xBC.to(sd), p["conv1d.weight"][:, 0], p.get("conv1d.bias"), state["conv"],
                                      mask=mask)  # fmt: skip
        x, B, C, dt, A = self._ssm_inputs(p, xBC, dt.to(sd), kept)
        if mask is not None:
            dt = dt * mask[..., None].to(dt.dtype)  # a pad: no decay, no input
        io = u.dtype if self.kernels and u.dtype in (torch.bfloat16, torch.float16) else sd  # the scan's X, B, C
        scan = torch.ops.edgeseq.ssd_scan if self.kernels else ssd_scan_ref
        y, ssm = scan(
            x.reshape(b, l, kept, self.headdim).to(io),  # (b, l, h, p)
            dt,
            A,
            B.reshape(b, l, self.ngroups, self.d_state).to(io),  # (b, l, g, n)
            C.reshape(b, l, self.ngroups, self.d_state).to(io),
            self.chunk_size,
            D=p["D"].to(sd),
            initial_state=state["ssm"],
        )
        return self._output(p, y.reshape(b, l, -1), z, u.dtype), {"conv": conv, "ssm": ssm}

    def step(self, p: dict[str, Tensor], u: Tensor, state: State, position: Tensor, kept: int):
        """u (b, d) -> (b, d), new state; one token through the recurrence."""
        b = u.size(0)
        z, xBC, dt = self._project(p, u, kept)
        if self.kernels:  # conv, dt, state update and output in one launch on CUDA
            y, conv, ssm = torch.ops.edgeseq.ssd_step(
                xBC, dt, state["conv"], p["conv1d.weight"][:, 0], p.get("conv1d.bias"), p["dt_bias"],
                -torch.exp(p["A_log"].to(state["ssm"].dtype)), p["D"], state["ssm"], self.ngroups, *self.dt_limit,
            )  # fmt: skip
            return self._output(p, y.reshape(b, -1), z, u.dtype), {"conv": conv, "ssm": ssm}
        sd = state["ssm"].dtype
        xBC, conv = causal_conv1d_step_ref(xBC.to(sd), state["conv"], p["conv1d.weight"][:, 0], p.get("conv1d.bias"))
        x, B, C, dt, A = self._ssm_inputs(p, xBC, dt.to(sd), kept)
        y, ssm = ssd_step_ref(
            state["ssm"],
            x.reshape(b, kept, self.headdim),  # (b, h, p)
            dt,
            A,
            B.reshape(b, self.ngroups, self.d_state),  # (b, g, n)
            C.reshape(b, self.ngroups, self.d_state),
            D=p["D"],
        )
        return self._output(p, y.reshape(b, -1), z, u.dtype), {"conv": conv, "ssm": ssm}
