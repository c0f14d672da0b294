"""The chunked SSD scan for prefill in Triton, beside its pure-torch twin.

Same math and axes as ``edgeseq.reference.ssd`` (b batch, l sequence, c chunk, q steps
in a chunk, h heads, g groups, p head channels, n state size). Comments name the
reference's numbered steps:

    X, dt, A, B --[edgeseq.kernels.ssd_states: steps 3, 4]--> a_cum (b, h, c*q), S (b, c, h, n, p), final
    X, dt, B, C, S, a_cum --[_chunk_scan: steps 2, 5, 6]--> Y (b, l, h, p)
                                            C S decayed  +  (C B^T o L) (dt X)  +  D X

Departures from the reference: the decay mask L is exp(a_cum[i] - a_cum[j]) (a difference
of cumulative sums, as fast kernels do) rather than a masked segment sum; matmul operands
are in the inputs' dtype (bf16/fp16 products accumulate in fp32; fp32 ones use 3xTF32,
``FP32_DOT``); the state is always fp32. A length l that is not a multiple of the chunk is
masked (step 0's dt = 0 padding), so nothing is copied or padded on the host.
"""

import torch
from torch import Tensor

from edgeseq.errors import UsageError
from edgeseq.kernels._common import FP32_DOT, KEY, configs, dot, prune
from edgeseq.kernels._triton import interpreting, next_pow2, require_triton, tl, triton
from edgeseq.kernels.ssd_states import chunk_states
from edgeseq.reference import ssd_scan_ref as _scan_math

_SCAN_NAMES, _SCAN_TILES = ("BLOCK_M", "BLOCK_K", "BLOCK_P"), [
    ((64, 32, 32), 4, 3), ((64, 32, 64), 4, 2), ((64, 64, 32), 4, 2), ((64, 64, 64), 4, 3),
    ((64, 64, 64), 8, 2), ((128, 32, 64), 8, 3), ((128, 64, 64), 8, 2), ((128, 64, 64), 4, 3),
]  # fmt: skip


def ssd_scan_ref(X, dt, A, B, C, chunk_size: int, D=None, initial_state=None) -> tuple[Tensor, Tensor]:
    """The twin of ``ssd_scan``: the reference scan, computed in fp32 (fp64 stays fp64).

    Returns Y in X's dtype and the final state (b, h, n, p) in fp32 (fp64 for fp64 X).
    """
    sd = torch.promote_types(X.dtype, torch.float32)
    init = None if initial_state is None else initial_state.to(sd)
    D = None if D is None else D.to(sd)
    Y, final = _scan_math(X.to(sd), dt.to(sd), A.to(sd), B.to(sd), C.to(sd), chunk_size, D, init)
    return Y.to(X.dtype).contiguous(), final.contiguous()


def ssd_chunk_scan_ref(X, dt, B, C, states, a_cum, D, chunk_size: int) -> Tensor:
    """The twin of the second launch (and plugin node): steps 2, 5 and 6 from the entering
    states and a_cum of ``ssd_chunk_state_ref``. Returns Y (b, l, h, p) in fp32."""
    b, l, h, p = X.shape
    g, q = B.size(2), chunk_size
    Y = []
    for c, start in enumerate(range(0, l, q)):
        piece = slice(start, start + q)
        x, d = X[:, piece].float(), dt[:, piece].float()  # (b, s, h, p), (b, s, h)
        Bh, Ch = (M[:, piece].float().repeat_interleave(h // g, dim=2) for M in (B, C))  # (b, s, h, n)
        a = a_cum[:, :, c * q : c * q + x.size(1)]  # (b, h, s)
        L = torch.exp(a[..., :, None] - a[..., None, :]).tril()  # (b, h, i, j): decay from j to i
        CB = torch.einsum("bihn,bjhn->bhij", Ch, Bh)
        y = torch.einsum("bhij,bjh,bjhp->bihp", CB * L, d, x)  # inside the chunk
        y = y + torch.einsum("bihn,bhnp->bihp", Ch, states[:, c].float()) * a.exp().transpose(1, 2)[..., None]
        Y.append(y + x * D.float()[:, None])
    return torch.cat(Y, 1) if Y else X.new_zeros(b, 0, h, p, dtype=torch.float32)


@triton.autotune(configs(_SCAN_NAMES, _SCAN_TILES), key=KEY, prune_configs_by={"early_config_prune": prune})
@triton.jit
def _chunk_scan_kernel(
    X, DT, B, C, S, ACUM, D, Y,
    seqlen, chunk_size, nheads, heads_per_group, headdim, dstate,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
    sy_b, sy_l, sy_h, sy_p,
    HAS_D: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """grid (m-blocks * p-blocks, b*h, c). Y rows m of one chunk, channels p; BLOCK_N covers n."""
    pid_mp, pid_bh, pid_c = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    b, h = pid_bh // nheads, pid_bh % nheads
    nchunks = tl.num_programs(2)
    m_block = pid_mp // tl.cdiv(headdim, BLOCK_P)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = (pid_mp % tl.cdiv(headdim, BLOCK_P)) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    start = pid_c * chunk_size
    valid_m = (offs_m < chunk_size) & (start + offs_m < seqlen)
    X += b * sx_b + h * sx_h
    DT += b * sdt_b + h * sdt_h
    B += b * sb_b + (h // heads_per_group) * sb_g
    C += b * sc_b + (h // heads_per_group) * sc_g
    ACUM += pid_bh * nchunks * chunk_size + start
    a_m = tl.load(ACUM + offs_m, mask=offs_m < chunk_size, other=0.0)
    c_m = tl.load(
        C + (start + offs_m)[:, None] * sc_l + offs_n[None, :] * sc_n,
        mask=valid_m[:, None] & (offs_n[None, :] < dstate),
        other=0.0,
    )
    # step 5: the state entering the chunk, read out by C and decayed to each row
    S += ((b * nchunks + pid_c) * nheads + h) * dstate * headdim
    state = tl.load(
        S + offs_n[:, None] * headdim + offs_p[None, :],
        mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < headdim),
        other=0.0,
    )
    acc = dot(c_m, state.to(c_m.dtype), tl.zeros((BLOCK_M, BLOCK_P), tl.float32), DOT, UPCAST)
    acc *= tl.exp(a_m)[:, None]
    # step 2: inside the chunk, (C B^T o L) (dt X) over the columns up to the diagonal
    for k0 in range(0, tl.minimum((m_block + 1) * BLOCK_M, chunk_size), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid_k = (offs_k < chunk_size) & (start + offs_k < seqlen)
        Bt = tl.load(
            B + offs_n[:, None] * sb_n + (start + offs_k)[None, :] * sb_l,
            mask=(offs_n[:, None] < dstate) & valid_k[None, :],
            other=0.0,
        )
        CB = dot(c_m, Bt, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), DOT, UPCAST)
        a_k = tl.load(ACUM + offs_k, mask=offs_k < chunk_size, other=0.0)
        dt_k = tl.load(DT + (start + offs_k) * sdt_l, mask=valid_k, other=0.0).to(tl.float32)
        causal = offs_m[:, None] >= offs_k[None, :]
        L = tl.exp(tl.where(causal, a_m[:, None] - a_k[None, :], float("-inf")))
        x_k = tl.load(
            X + (start + offs_k)[:, None] * sx_l + offs_p[None, :] * sx_p,
            mask=valid_k[:, None] & (offs_p[None, :] < headdim),
            other=0.0,
        )
        acc = dot((CB * L * dt_k[None, :]).to(x_k.dtype), x_k, acc, DOT, UPCAST)
    # step 6: the skip connection
    mask_mp = valid_m[:, None] & (offs_p[None, :] < headdim)
    if HAS_D:
        x_m = tl.load(X + (start + offs_m)[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mask_mp, other=0.0)
        acc += x_m.to(tl.float32) * tl.load(D + h).to(tl.float32)
    Y += b * sy_b + h * sy_h
    tl.store(Y + (start + offs_m)[:, None] * sy_l + offs_p[None, :] * sy_p, acc, mask=mask_mp)


# ---- the TensorRT plugin's entry, compiled to PTX by edgeseq.kernels.aot: TensorRT's argument
# order and contiguous tensors, as ssd_states.ssd_chunk_state_entry; the launcher's kernel body.
_chunk_scan_body = getattr(_chunk_scan_kernel, "fn", _chunk_scan_kernel)  # the jit function under the autotuner


@triton.jit
def ssd_chunk_scan_entry(
    X, DT, B, C, S, ACUM, D, seqlen, Y,
    CHUNK: tl.constexpr, NHEADS: tl.constexpr, NGROUPS: tl.constexpr, HEADDIM: tl.constexpr,
    DSTATE: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """X, DT, B, C as above, S and ACUM from ssd_chunk_state_entry, D (h,) -> Y (b, l, h, p).
    grid (m*p tiles, b*h, c); BLOCK_N covers n."""
    H, P, N, G = NHEADS, HEADDIM, DSTATE, NGROUPS
    _chunk_scan_body(
        X, DT, B, C, S, ACUM, D, Y, seqlen, CHUNK, H, H // G, P, N,
        seqlen * H * P, H * P, P, 1, seqlen * H, H, 1, seqlen * G * N, G * N, N, 1, seqlen * G * N, G * N, N, 1,
        seqlen * H * P, H * P, P, 1,
        HAS_D=True, DOT=DOT, UPCAST=False, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_P=BLOCK_P,
    )  # fmt: skip


def ssd_scan(X, dt, A, B, C, chunk_size: int, D=None, initial_state=None, fused_state: bool | None = None):
    """Chunked SSD scan in Triton; two or three launches, no host loop over chunks or heads.

    X (b, l, h, p) fp32/bf16/fp16, any strides; dt (b, l, h) after softplus; A (h,);
    B, C (b, l, g, n) with g dividing h; D (h,) or None; initial_state (b, h, n, p) or None.
    Returns Y (b, l, h, p) in X's dtype and the final state (b, h, n, p) in fp32.

    The states entering the chunks come from one fused pass over the sequence per (b, h)
    (``fused_state=True``: two launches) or from every chunk in parallel plus a serial pass
    across chunks (False: three launches); None picks the fused pass when b*h fills the GPU.
    """
    require_triton()
    b, l, h, p = X.shape
    g, n = B.shape[2:]
    if h % g or B.shape != C.shape or B.dtype != C.dtype or B.shape[:2] != (b, l):
        raise UsageError(f"ssd_scan needs B, C (b, l, g, n) alike, g dividing h; got X {tuple(X.shape)}, "
                         f"B {tuple(B.shape)} {B.dtype}, C {tuple(C.shape)} {C.dtype}")  # fmt: skip
    Y = torch.empty(b, l, h, p, dtype=X.dtype, device=X.device)
    final = torch.empty(b, h, n, p, dtype=torch.float32, device=X.device)
    if l == 0:
        return Y, final.copy_(initial_state) if initial_state is not None else final.zero_()
    a_cum, states = chunk_states(X, dt, A, B, chunk_size, initial_state, final, fused_state)
    c = states.size(1)
    dims = (l, chunk_size, h, h // g, p, n)  # seqlen, chunk_size, nheads, heads_per_group, headdim, dstate
    precision = FP32_DOT if X.dtype == torch.float32 else "tf32"  # moot for half operands
    upcast = interpreting() and X.dtype == torch.bfloat16

    def scan_grid(meta):
        return triton.cdiv(chunk_size, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]), b * h, c

    strides = (*X.stride(), *dt.stride(), *B.stride(), *C.stride(), *Y.stride())
    _chunk_scan_kernel[scan_grid](
        X, dt, B, C, states, a_cum, D if D is not None else A, Y, *dims, *strides,
        HAS_D=D is not None, DOT=precision, UPCAST=upcast, BLOCK_N=next_pow2(n),
    )  # fmt: skip
    return Y, final
