"""One decode step of a Mamba2 layer's SSM part, fused into one Triton launch, beside its twin.

Follows ``Mamba2Mixer.step`` from the in_proj output to the SSM output y, before the
gated norm (b batch, h heads, g groups, p head channels, n state size, k conv taps):

    xBC (b, d_inner + 2*g*n) --conv state shift, depthwise conv + bias, SiLU--> x, B, C
    dt (b, h) --softplus(dt + dt_bias), clamp to dt_limit--> dt;  dA = exp(dt * A)
    state <- dA * state + B^T (dt * x)      (n, p) per head, fp32
    y = C state + D * x                     (p,) per head

The grid is (p-blocks, h, b). Each program convolves its head's x channels and, again,
its group's B and C channels (n values: cheaper than a second launch); only the first
head of a group, at p-block 0, writes the B/C columns of the new conv state. Outputs are
new tensors: the ops must not alias their inputs, and the B/C conv columns are read by
programs other than the one that writes them.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeseq import reference
from edgeseq.errors import UsageError
from edgeseq.kernels._triton import next_pow2, require_triton, tl, triton


def ssd_step_ref(xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A, D, ssm_state, ngroups: int,
                 dt_min: float = 0.0, dt_max: float = float("inf")) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The twin of ``ssd_step``: ``Mamba2Mixer.step``'s SSM math through the reference functions.

    Shapes as ``ssd_step``. Computes in the ssm state's dtype.
    """
    b, h = dt.shape
    n, p = ssm_state.shape[2:]
    sd = ssm_state.dtype
    xBC, new_conv = reference.causal_conv1d_step_ref(xBC.to(sd), conv_state, conv_weight, conv_bias)
    x, B, C = xBC.split([h * p, ngroups * n, ngroups * n], dim=-1)
    dt = F.softplus(dt.to(sd) + dt_bias.to(sd)).clamp(dt_min, dt_max)
    y, new_ssm = reference.ssd_step_ref(
        ssm_state, x.reshape(b, h, p), dt, A.to(sd), B.reshape(b, ngroups, n), C.reshape(b, ngroups, n), D
    )
    return y.contiguous(), new_conv.contiguous(), new_ssm.contiguous()


@triton.jit
def _conv_silu(XBC, CONV, W, BIAS, CONV_OUT, ch, mask, write, sxbc_c, sconv_c, sconv_k, sw_c, sw_k,
               K: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """SiLU(depthwise conv) of channels ``ch`` at the new token, in fp32; writes their new
    conv state (shifted left by one, the token last) where ``mask & write``."""
    x_new = tl.load(XBC + ch * sxbc_c, mask=mask, other=0.0).to(tl.float32)
    acc = x_new * tl.load(W + ch * sw_c + (K - 1) * sw_k, mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 1):
        past = tl.load(CONV + ch * sconv_c + j * sconv_k, mask=mask, other=0.0).to(tl.float32)
        acc += past * tl.load(W + ch * sw_c + j * sw_k, mask=mask, other=0.0).to(tl.float32)
        if j > 0:
            tl.store(CONV_OUT + ch * (K - 1) + j - 1, past, mask=mask & write)
    tl.store(CONV_OUT + ch * (K - 1) + K - 2, x_new, mask=mask & write)
    if HAS_BIAS:
        acc += tl.load(BIAS + ch, mask=mask, other=0.0).to(tl.float32)
    return acc * tl.sigmoid(acc)


@triton.jit
def _ssd_step_kernel(
    XBC, DT, CONV, W, BIAS, DT_BIAS, A, D, SSM, Y, CONV_OUT, SSM_OUT,
    heads_per_group, headdim, dstate, ngroups, conv_dim, dt_min, dt_max,
    sxbc_b, sxbc_c, sdt_b, sdt_h, sconv_b, sconv_c, sconv_k, sw_c, sw_k, sssm_b, sssm_h, sssm_n, sssm_p,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """grid (cdiv(p, BLOCK_P), h, b); BLOCK_N covers n."""
    pid_p, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    nheads = tl.num_programs(1)
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < headdim, offs_n < dstate
    XBC += b * sxbc_b
    CONV += b * sconv_b
    CONV_OUT += b * conv_dim * (K - 1)
    conv = (XBC, CONV, W, BIAS, CONV_OUT)
    strides = (sxbc_c, sconv_c, sconv_k, sw_c, sw_k)
    # 1. conv over this head's x channels and its group's B and C channels
    x = _conv_silu(*conv, h * headdim + offs_p, mask_p, True, *strides, K, HAS_BIAS)
    writes_bc = (h % heads_per_group == 0) & (pid_p == 0)
    bc = nheads * headdim + g * dstate + offs_n
    B = _conv_silu(*conv, bc, mask_n, writes_bc, *strides, K, HAS_BIAS)
    C = _conv_silu(*conv, bc + ngroups * dstate, mask_n, writes_bc, *strides, K, HAS_BIAS)
    # 2. dt = softplus(dt + dt_bias), as torch's (linear above 20), clamped; the decay dA
    v = tl.load(DT + b * sdt_b + h * sdt_h).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32)
    u = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + u
    log1p_u = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))  # accurate log(1 + u) for small u
    dt = tl.minimum(tl.maximum(tl.where(v > 20.0, v, log1p_u), dt_min), dt_max)
    dA = tl.exp(dt * tl.load(A + h).to(tl.float32))
    # 3. state <- dA * state + B^T (dt * x)
    tile = offs_n[:, None] * sssm_n + offs_p[None, :] * sssm_p
    mask_np = mask_n[:, None] & mask_p[None, :]
    state = tl.load(SSM + b * sssm_b + h * sssm_h + tile, mask=mask_np, other=0.0).to(tl.float32)
    state = state * dA + B[:, None] * (dt * x)[None, :]
    bh = b * nheads + h
    tl.store(SSM_OUT + bh * dstate * headdim + offs_n[:, None] * headdim + offs_p[None, :], state, mask=mask_np)
    # 4. y = C state + D x
    y = tl.sum(C[:, None] * state, axis=0)
    if HAS_D:
        y += tl.load(D + h).to(tl.float32) * x
    tl.store(Y + bh * headdim + offs_p, y, mask=mask_p)


@triton.jit
def ssd_step_entry(
    XBC, DT, CONV, W, BIAS, DT_BIAS, A, D, SSM, Y, CONV_OUT, SSM_OUT,
    NHEADS: tl.constexpr, NGROUPS: tl.constexpr, HEADDIM: tl.constexpr, DSTATE: tl.constexpr, K: tl.constexpr,
    DT_MIN: tl.constexpr, DT_MAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The TensorRT plugin's entry (edgeseq.kernels.aot compiles it to PTX): contiguous tensors,
    inputs then outputs, no scalar arguments, the model's sizes baked in. Shapes as ``ssd_step``,
    with conv_bias and D present; grid (cdiv(p, BLOCK_P), h, b)."""
    H, P, N, G = NHEADS, HEADDIM, DSTATE, NGROUPS
    conv_dim = H * P + 2 * G * N
    _ssd_step_kernel(
        XBC, DT, CONV, W, BIAS, DT_BIAS, A, D, SSM, Y, CONV_OUT, SSM_OUT, H // G, P, N, G, conv_dim, DT_MIN, DT_MAX,
        conv_dim, 1, H, 1, conv_dim * (K - 1), K - 1, 1, K, 1, H * N * P, N * P, P, 1,
        K=K, HAS_BIAS=True, HAS_D=True, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )  # fmt: skip


def ssd_step(xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A, D, ssm_state, ngroups: int,
             dt_min: float = 0.0, dt_max: float = float("inf")) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One token through the conv and the SSM recurrence, in one launch.

    xBC (b, h*p + 2*g*n): in_proj's conv input (x, B, C), any float dtype; dt (b, h): in_proj's
    dt before softplus; conv_state (b, h*p + 2*g*n, k-1); conv_weight (h*p + 2*g*n, k);
    conv_bias (same,) or None; dt_bias, A, D (h,) (D may be None); ssm_state (b, h, n, p) fp32.
    Returns y (b, h, p) fp32, the new conv state (conv_state's dtype, contiguous) and the
    new ssm state (b, h, n, p) fp32. Inputs are not modified.
    """
    require_triton()
    b, h = dt.shape
    n, p = ssm_state.shape[2:]
    conv_dim, k = conv_weight.shape
    if k < 2 or ssm_state.dtype != torch.float32:
        raise UsageError(
            f"ssd_step needs a conv of at least 2 taps and an fp32 ssm state (got k={k}, {ssm_state.dtype})"
        )
    y = torch.empty(b, h, p, dtype=torch.float32, device=xBC.device)
    new_conv = torch.empty(b, conv_dim, k - 1, dtype=conv_state.dtype, device=xBC.device)
    new_ssm = torch.empty(b, h, n, p, dtype=torch.float32, device=xBC.device)
    block_p = min(next_pow2(p), 32)
    _ssd_step_kernel[(triton.cdiv(p, block_p), h, b)](
        xBC, dt, conv_state, conv_weight, conv_bias if conv_bias is not None else dt_bias, dt_bias, A,
        D if D is not None else A, ssm_state, y, new_conv, new_ssm,
        h // ngroups, p, n, ngroups, conv_dim, float(dt_min), float(dt_max),
        *xBC.stride(), *dt.stride(), *conv_state.stride(), *conv_weight.stride(), *ssm_state.stride(),
        K=k, HAS_BIAS=conv_bias is not None, HAS_D=D is not None, BLOCK_P=block_p, BLOCK_N=next_pow2(n, 2),
    )  # fmt: skip
    return y, new_conv, new_ssm
