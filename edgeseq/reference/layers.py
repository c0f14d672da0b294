"""Reference math for the pieces around the scan: causal conv, norms, RoPE, gated MLP.

Shapes use b batch, l sequence, c channels, k conv kernel, h heads, d head dim.
Norms compute in fp32 (fp64 when given fp64), as the checkpoints' own code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pads_first(window: Tensor, mask: Tensor) -> Tensor:
    """Move each row's left pads ahead of the state columns of a conv window.

    window (b, c, s+l): s state columns, then l tokens of which each row's first p are
    pads; mask (b, l), 1 = token, 0 = pad (pads only before tokens). Returns the window
    with columns [pads | state | tokens]: every token's conv window then covers the state
    and the tokens before it, never a pad, and the last s columns are the state a pad
    leaves untouched. Column i < s+p comes from column (i + s) mod (s + p).
    """
    b, c, n = window.shape
    s = n - mask.size(1)
    pads = mask.size(1) - mask.sum(1, keepdim=True)  # (b, 1)
    lead = (s + pads).clamp(min=1)  # columns before the first token (at least 1: no mod by 0)
    i = torch.arange(n, device=window.device)
    src = torch.where(i >= lead, i, torch.remainder(i + s, lead))  # (b, n)
    return window.gather(2, src[:, None, :].expand(b, c, n))


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    state: Tensor | None = None,
    silu: bool = True,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over a sequence.

    x (b, l, c); weight (c, k); bias (c,) or None; state (b, c, k-1): the last k-1 inputs
    before x (zeros at the start of a stream); mask (b, l) or None: 0 marks a left pad,
    which no token's window sees and the state skips (``pads_first``; its own output is
    meaningless). Returns y (b, l, c) and the new state.
    """
    b, l, c = x.shape
    k = weight.size(-1)
    if state is None:
        state = x.new_zeros(b, c, k - 1)
    if l == 0:
        return x, state
    window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (b, c, k-1+l)
    if mask is not None:
        window = pads_first(window, mask)
    y = F.conv1d(window, weight[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype), groups=c)
    new_state = window[..., window.size(-1) - (k - 1) :]
    y = y.transpose(1, 2)  # (b, l, c)
    return (F.silu(y) if silu else y), new_state


def causal_conv1d_step_ref(
    x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, silu: bool = True
) -> tuple[Tensor, Tensor]:
    """One token: x (b, c); state (b, c, k-1); weight (c, k). Returns y (b, c), new state."""
    window = torch.cat([state, x[..., None].to(state.dtype)], dim=-1)  # (b, c, k)
    y = (window * weight.to(state.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(state.dtype)
    return (F.silu(y) if silu else y), window[..., 1:]


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., d); weight (d,). Returns x's dtype."""
    xf = x.to(_compute_dtype(x))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(xf.dtype) * xf).to(x.dtype)


def gate_ref(x: Tensor, z: Tensor) -> Tensor:
    """Mamba2's output gate without the norm: x * silu(z) (Falcon-H1's ``mamba_rms_norm=False``).

    x, z (..., c). Returns x's dtype.
    """
    dt = _compute_dtype(x)
    return (x.to(dt) * F.silu(z.to(dt))).to(x.dtype)


def gated_rmsnorm_ref(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """Mamba2's output norm: RMSNorm(x * silu(z)) over groups of ``group_size`` channels.

    x, z (..., c); weight (c,); c a multiple of group_size. Returns x's dtype.
    """
    dt = _compute_dtype(x)
    y = x.to(dt) * F.silu(z.to(dt))
    groups = y.unflatten(-1, (-1, group_size))  # (..., g, c/g)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(dt) * groups.flatten(-2)).to(x.dtype)


def relu2_mlp_ref(x: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Nemotron-H's MLP, no gate: down(relu(up(x))²). x (..., d), w_up (f, d), w_down (d, f)."""
    return F.linear(F.relu(F.linear(x, w_up)).square(), w_down)


def gated_mlp_ref(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, act=F.silu) -> Tensor:
    """down(act(gate(x)) * up(x)), act SiLU unless given. x (..., d); w_gate, w_up (f, d); w_down (d, f)."""
    return F.linear(act(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def rope_ref(x: Tensor, positions: Tensor, theta: float, rot_dim: int) -> Tensor:
    """Rotary embedding on the leading ``rot_dim`` channels, halves rotated (not interleaved).

    x (b, l, h, d); positions (b, l) integer. Returns x's dtype.
    """
    if rot_dim == 0:
        return x
    dt = _compute_dtype(x)
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, device=x.device, dtype=torch.float32) / rot_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (b, l, rot/2), fp32 as upstream
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :].to(dt)  # (b, l, 1, rot)
    xr, xpass = x[..., :rot_dim].to(dt), x[..., rot_dim:]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = xr * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()
    return torch.cat([rotated.to(x.dtype), xpass], dim=-1)
