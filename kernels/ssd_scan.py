"""The chunked SSD scan for prefill, in three Triton launches, beside its pure-torch twin.

Same math and axes as ``edgeseq.reference.ssd`` (b batch, l sequence, c chunk, q steps
in a chunk, h heads, g groups, p head channels, n state size). Comments name the
reference's numbered steps; the launches split them so:

    X, dt, A, B --[_chunk_state: step 3]--> a_cum (b, h, c*q)     log-decay since the chunk's start
                                            S     (b, c, h, n, p) each chunk's own end state
    S, a_cum ----[_state_passing: step 4]-> S     (b, c, h, n, p) the state entering each chunk
                                            final (b, h, n, p)    (S is overwritten in place)
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

from edgeseq.kernels._triton import interpreting, next_pow2, require_triton, tl, triton
from edgeseq.reference import ssd_scan_ref as _scan_math

FP32_DOT = "tf32x3"  # fp32 products on tensor cores, three passes: fp32-level error ("ieee" spills)


def ssd_scan_ref(X, dt, A, B, C, chunk_size: int, D=None, initial_state=None) -> tuple[Tensor, Tensor]:
    """The twin of ``ssd_scan``: the reference scan, computed in fp32 (fp64 stays fp64).

    Returns Y in X's dtype and the final state (b, h, n, p) in fp32 (fp64 for fp64 X).
    """
    sd = torch.promote_types(X.dtype, torch.float32)
    init = None if initial_state is None else initial_state.to(sd)
    D = None if D is None else D.to(sd)
    Y, final = _scan_math(X.to(sd), dt.to(sd), A.to(sd), B.to(sd), C.to(sd), chunk_size, D, init)
    return Y.to(X.dtype).contiguous(), final.contiguous()


def ssd_chunk_state_ref(X, dt, A, B, chunk_size: int, initial_state) -> tuple[Tensor, Tensor, Tensor]:
    """The twin of the first launch (and the first plugin node): steps 3 and 4.

    Returns a_cum (b, h, c*q) (log-decay from each chunk's start, constant over the padding),
    the states entering the chunks (b, c, h, n, p) and the final state (b, h, n, p), in fp32.
    """
    b, l, h, p = X.shape
    state, a_cum, entering = initial_state.float(), [], []
    for start in range(0, l, chunk_size):  # chunk by chunk through the reference scan: slow, plain
        piece = slice(start, start + chunk_size)
        entering.append(state)
        a = dt[:, piece].float() * A.float()  # (b, q, h)
        a = torch.cat([a, a.new_zeros(b, chunk_size - a.size(1), h)], 1)  # padding: dt = 0
        a_cum.append(a.cumsum(1).transpose(1, 2))  # (b, h, q)
        _, state = ssd_scan_ref(X[:, piece], dt[:, piece], A, B[:, piece], B[:, piece], chunk_size, None, state)
    return torch.cat(a_cum, -1).contiguous(), torch.stack(entering, 1).contiguous(), state


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


# The tuning space, small to keep the first call's autotuning short: (tile, num_warps, num_stages).
# Smallest first (the fallback). Large tiles get 8 warps: at 4 they spill (ptxas -v, sm_90).
_STATE_NAMES, _STATE_TILES = ("BLOCK_N", "BLOCK_P", "BLOCK_K"), [
    ((64, 32, 32), 4, 3), ((64, 64, 32), 4, 3), ((64, 64, 64), 4, 2),
    ((128, 32, 64), 8, 2), ((128, 64, 32), 8, 3), ((128, 64, 64), 8, 2),
]  # fmt: skip
_SCAN_NAMES, _SCAN_TILES = ("BLOCK_M", "BLOCK_K", "BLOCK_P"), [
    ((64, 32, 32), 4, 3), ((64, 32, 64), 4, 2), ((64, 64, 32), 4, 2), ((64, 64, 64), 4, 3),
    ((64, 64, 64), 8, 2), ((128, 32, 64), 8, 3), ((128, 64, 64), 8, 2), ((128, 64, 64), 4, 3),
]  # fmt: skip
_FUSED_TILES = [
    ((32, 32, 64), 4, 3), ((32, 64, 64), 4, 3), ((64, 32, 64), 4, 3),
    ((64, 64, 32), 4, 4), ((64, 64, 64), 4, 3), ((128, 64, 64), 8, 2),
]  # fmt: skip
_KEY = ["chunk_size", "headdim", "dstate"]


def tuning_space(names, tiles):
    return [triton.Config(dict(zip(names, t)), num_warps=w, num_stages=s) for t, w, s in tiles]


def _configs(names, tiles):
    """One 16-wide config under the interpreter (the CPU tests), the tuning space on a GPU."""
    if interpreting():
        return [triton.Config(dict.fromkeys(names, 16), num_warps=1)]
    return tuning_space(names, tiles)


def _prune(configs, named_args, **kwargs):
    """Drop tiles larger than the padded chunk, head dim or state (they only add masked work)."""
    limit = {
        "BLOCK_M": next_pow2(named_args["chunk_size"]),
        "BLOCK_K": next_pow2(named_args["chunk_size"]),
        "BLOCK_P": next_pow2(named_args["headdim"]),
        "BLOCK_N": next_pow2(named_args["dstate"]),
    }
    kept = [c for c in configs if all(v <= limit[k] for k, v in c.kwargs.items())]
    return kept or configs[:1]


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST moves operands to fp32 first: Triton's CPU interpreter cannot
    multiply bf16 (it sees the raw bits), so the tests round to bf16, then upcast."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT)


@triton.autotune(_configs(_STATE_NAMES, _STATE_TILES), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _chunk_state_kernel(
    X, DT, A, B, ACUM, S,
    seqlen, chunk_size, nheads, heads_per_group, headdim, dstate,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sb_b, sb_l, sb_g, sb_n,
    DOT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grid (n-blocks * p-blocks, b*h, c). Writes a_cum and the chunk's end state tile S[n, p]."""
    pid_np, pid_bh, pid_c = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    b, h = pid_bh // nheads, pid_bh % nheads
    nchunks = tl.num_programs(2)
    offs_n = (pid_np // tl.cdiv(headdim, BLOCK_P)) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = (pid_np % tl.cdiv(headdim, BLOCK_P)) * BLOCK_P + tl.arange(0, BLOCK_P)
    start = pid_c * chunk_size
    X += b * sx_b + h * sx_h
    DT += b * sdt_b + h * sdt_h
    B += b * sb_b + (h // heads_per_group) * sb_g
    A_h = tl.load(A + h).to(tl.float32)
    # step 3a: the chunk's total log-decay (masked steps have dt = 0: no decay)
    offs_q = tl.arange(0, BLOCK_Q)
    dt_q = tl.load(DT + (start + offs_q) * sdt_l, mask=(offs_q < chunk_size) & (start + offs_q < seqlen), other=0.0)
    a_end = tl.sum(dt_q.to(tl.float32) * A_h)
    # step 3b: B^T (decay_to_end * dt * X), BLOCK_K steps at a time, carrying a_cum along
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    a_before = a_end * 0.0
    for k0 in range(0, chunk_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid_k = (offs_k < chunk_size) & (start + offs_k < seqlen)
        dt_k = tl.load(DT + (start + offs_k) * sdt_l, mask=valid_k, other=0.0).to(tl.float32)
        a_k = a_before + tl.cumsum(dt_k * A_h, axis=0)
        a_before += tl.sum(dt_k * A_h)
        tl.store(ACUM + pid_bh * nchunks * chunk_size + start + offs_k, a_k, mask=(offs_k < chunk_size) & (pid_np == 0))
        x = tl.load(
            X + (start + offs_k)[:, None] * sx_l + offs_p[None, :] * sx_p,
            mask=valid_k[:, None] & (offs_p[None, :] < headdim),
            other=0.0,
        )
        Bt = tl.load(  # (BLOCK_N, BLOCK_K): B transposed through its strides
            B + offs_n[:, None] * sb_n + (start + offs_k)[None, :] * sb_l,
            mask=(offs_n[:, None] < dstate) & valid_k[None, :],
            other=0.0,
        )
        w = tl.exp(a_end - a_k) * dt_k
        acc = _dot(Bt, (x.to(tl.float32) * w[:, None]).to(Bt.dtype), acc, DOT, UPCAST)
    S += ((b * nchunks + pid_c) * nheads + h) * dstate * headdim
    tl.store(
        S + offs_n[:, None] * headdim + offs_p[None, :],
        acc,
        mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < headdim),
    )


def _passing_configs():
    if interpreting():
        return [triton.Config({"BLOCK": 256}, num_warps=1)]
    return [triton.Config({"BLOCK": block}, num_warps=w) for block, w in ((256, 2), (512, 4), (1024, 4), (2048, 8))]


@triton.autotune(_passing_configs(), key=["headdim", "dstate", "nheads"])
@triton.jit
def _state_passing_kernel(
    OWN, ACUM, INIT, S, FINAL,
    chunk_size, nchunks, nheads, headdim, dstate, si_b, si_h, si_n, si_p,
    HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grid (cdiv(n*p, BLOCK), b*h). The recurrence across chunks, in fp32:
    S[c] <- state entering chunk c (in S's dtype); state <- exp(a_end[c]) * state + OWN[c].
    Serial over chunks, so each iteration's loads are issued one chunk ahead."""
    pid, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // nheads, pid_bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # flat (n, p) index
    mask = offs < dstate * headdim
    if HAS_INIT:
        init_ptrs = INIT + b * si_b + h * si_h + (offs // headdim) * si_n + (offs % headdim) * si_p
        state = tl.load(init_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    chunk_stride = nheads * dstate * headdim
    base = (b * nchunks * nheads + h) * dstate * headdim + offs
    ACUM += pid_bh * nchunks * chunk_size + chunk_size - 1
    own = tl.load(OWN + base, mask=mask, other=0.0)
    a_end = tl.load(ACUM)
    for c in range(nchunks):
        more = c + 1 < nchunks
        own_next = tl.load(OWN + base + (c + 1) * chunk_stride, mask=mask & more, other=0.0)
        a_next = tl.load(ACUM + (c + 1) * chunk_size, mask=more, other=0.0)
        tl.store(S + base + c * chunk_stride, state.to(S.dtype.element_ty), mask=mask)
        state = state * tl.exp(a_end) + own
        own, a_end = own_next, a_next
    tl.store(FINAL + pid_bh * dstate * headdim + offs, state, mask=mask)


@triton.autotune(
    _configs(_STATE_NAMES, _FUSED_TILES), key=[*_KEY, "nheads"], prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _state_scan_kernel(
    X, DT, A, B, INIT, ACUM, S, FINAL,
    seqlen, chunk_size, nheads, heads_per_group, headdim, dstate,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sb_b, sb_l, sb_g, sb_n, si_b, si_h, si_n, si_p,
    HAS_INIT: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grid (n-blocks * p-blocks, b*h). Steps 3 and 4 in one pass over the sequence, BLOCK_K
    steps at a time: state <- exp(a over the block) * state + B^T (decay_to_block_end * dt * X).
    At each chunk's start the state is stored to S (the state entering the chunk, in S's dtype)
    and a_cum restarts; the last state is the final one (fp32)."""
    pid_np, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // nheads, pid_bh % nheads
    offs_n = (pid_np // tl.cdiv(headdim, BLOCK_P)) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = (pid_np % tl.cdiv(headdim, BLOCK_P)) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_np = (offs_n[:, None] < dstate) & (offs_p[None, :] < headdim)
    X += b * sx_b + h * sx_h
    DT += b * sdt_b + h * sdt_h
    B += b * sb_b + (h // heads_per_group) * sb_g
    A_h = tl.load(A + h).to(tl.float32)
    if HAS_INIT:
        init = INIT + b * si_b + h * si_h + offs_n[:, None] * si_n + offs_p[None, :] * si_p
        state = tl.load(init, mask=mask_np, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    nchunks = tl.cdiv(seqlen, chunk_size)
    blocks_per_chunk = tl.cdiv(chunk_size, BLOCK_K)
    tile = offs_n[:, None] * headdim + offs_p[None, :]
    chunk_stride = nheads * dstate * headdim
    S += (b * nchunks * nheads + h) * dstate * headdim
    a_run = A_h * 0.0  # log-decay from the chunk's start to the block's start
    for i in range(nchunks * blocks_per_chunk):  # one flat loop: the pipeliner prefetches across chunks
        c, k0 = (i // blocks_per_chunk).to(tl.int64), (i % blocks_per_chunk) * BLOCK_K
        first = k0 == 0
        tl.store(S + c * chunk_stride + tile, state.to(S.dtype.element_ty), mask=mask_np & first)
        a_run = tl.where(first, 0.0, a_run)
        start = c * chunk_size
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid_k = (offs_k < chunk_size) & (start + offs_k < seqlen)
        dt_k = tl.load(DT + (start + offs_k) * sdt_l, mask=valid_k, other=0.0).to(tl.float32)
        a_k = a_run + tl.cumsum(dt_k * A_h, axis=0)
        a_next = a_run + tl.sum(dt_k * A_h)
        tl.store(ACUM + (pid_bh * nchunks + c) * chunk_size + offs_k, a_k, mask=(offs_k < chunk_size) & (pid_np == 0))
        x = tl.load(
            X + (start + offs_k)[:, None] * sx_l + offs_p[None, :] * sx_p,
            mask=valid_k[:, None] & (offs_p[None, :] < headdim),
            other=0.0,
        )
        Bt = tl.load(  # (BLOCK_N, BLOCK_K): B transposed through its strides
            B + offs_n[:, None] * sb_n + (start + offs_k)[None, :] * sb_l,
            mask=(offs_n[:, None] < dstate) & valid_k[None, :],
            other=0.0,
        )
        w = tl.exp(a_next - a_k) * dt_k
        state = _dot(Bt, (x.to(tl.float32) * w[:, None]).to(Bt.dtype), state * tl.exp(a_next - a_run), DOT, UPCAST)
        a_run = a_next
    tl.store(FINAL + pid_bh * dstate * headdim + tile, state, mask=mask_np)


@triton.autotune(_configs(_SCAN_NAMES, _SCAN_TILES), key=_KEY, prune_configs_by={"early_config_prune": _prune})
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
    acc = _dot(c_m, state.to(c_m.dtype), tl.zeros((BLOCK_M, BLOCK_P), tl.float32), DOT, UPCAST)
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
        CB = _dot(c_m, Bt, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), DOT, UPCAST)
        a_k = tl.load(ACUM + offs_k, mask=offs_k < chunk_size, other=0.0)
        dt_k = tl.load(DT + (start + offs_k) * sdt_l, mask=valid_k, other=0.0).to(tl.float32)
        causal = offs_m[:, None] >= offs_k[None, :]
        L = tl.exp(tl.where(causal, a_m[:, None] - a_k[None, :], float("-inf")))
        x_k = tl.load(
            X + (start + offs_k)[:, None] * sx_l + offs_p[None, :] * sx_p,
            mask=valid_k[:, None] & (offs_p[None, :] < headdim),
            other=0.0,
        )
        acc = _dot((CB * L * dt_k[None, :]).to(x_k.dtype), x_k, acc, DOT, UPCAST)
    # step 6: the skip connection
    mask_mp = valid_m[:, None] & (offs_p[None, :] < headdim)
    if HAS_D:
        x_m = tl.load(X + (start + offs_m)[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mask_mp, other=0.0)
        acc += x_m.to(tl.float32) * tl.load(D + h).to(tl.float32)
    Y += b * sy_b + h * sy_h
    tl.store(Y + (start + offs_m)[:, None] * sy_l + offs_p[None, :] * sy_p, acc, mask=mask_mp)


# ---- entry points for TensorRT plugins (edgeseq.kernels.aot compiles them to PTX) ----------
# TensorRT launches an AOT plugin kernel with (input pointers, int32 scalars, output pointers);
# tensors are contiguous, the model's sizes are constexprs baked into the PTX, and the only
# scalar is the sequence length. They run the same kernel bodies as the launchers above.
_state_scan_body = getattr(_state_scan_kernel, "fn", _state_scan_kernel)  # the jit function under the autotuner
_chunk_scan_body = getattr(_chunk_scan_kernel, "fn", _chunk_scan_kernel)


@triton.jit
def ssd_chunk_state_entry(
    X, DT, A, B, INIT, seqlen, ACUM, S, FINAL,
    CHUNK: tl.constexpr, NHEADS: tl.constexpr, NGROUPS: tl.constexpr, HEADDIM: tl.constexpr,
    DSTATE: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """X (b, l, h, p), DT (b, l, h), A (h,), B (b, l, g, n), INIT (b, h, n, p) -> ACUM (b, h, c*q),
    S (b, c, h, n, p) the states entering chunks, FINAL (b, h, n, p). grid (n*p tiles, b*h)."""
    H, P, N, G = NHEADS, HEADDIM, DSTATE, NGROUPS
    _state_scan_body(
        X, DT, A, B, INIT, ACUM, S, FINAL, seqlen, CHUNK, H, H // G, P, N,
        seqlen * H * P, H * P, P, 1, seqlen * H, H, 1, seqlen * G * N, G * N, N, 1, H * N * P, N * P, P, 1,
        HAS_INIT=True, DOT=DOT, UPCAST=False, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K,
    )  # fmt: skip


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


def _parallel_programs(device: torch.device) -> int:
    """Batch x heads from which the fused state pass fills the GPU (its SM count)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter: the three-launch path unless asked
    return torch.cuda.get_device_properties(device).multi_processor_count


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
        raise ValueError(f"ssd_scan needs B, C (b, l, g, n) alike, g dividing h; got X {tuple(X.shape)}, "
                         f"B {tuple(B.shape)} {B.dtype}, C {tuple(C.shape)} {C.dtype}")  # fmt: skip
    Y = torch.empty(b, l, h, p, dtype=X.dtype, device=X.device)
    final = torch.empty(b, h, n, p, dtype=torch.float32, device=X.device)
    if l == 0:
        return Y, final.copy_(initial_state) if initial_state is not None else final.zero_()
    c = triton.cdiv(l, chunk_size)
    a_cum = torch.empty(b, h, c * chunk_size, dtype=torch.float32, device=X.device)
    dims = (l, chunk_size, h, h // g, p, n)  # seqlen, chunk_size, nheads, heads_per_group, headdim, dstate
    strides = (*X.stride(), *dt.stride(), *B.stride())
    dot = FP32_DOT if X.dtype == torch.float32 else "tf32"  # moot for half operands
    upcast = interpreting() and X.dtype == torch.bfloat16
    init = initial_state if initial_state is not None else final  # a placeholder pointer when absent
    # the states entering chunks feed C's products only: X's dtype, as the dot would round them
    states = torch.empty(b, c, h, n, p, dtype=X.dtype, device=X.device)
    if fused_state is None:
        fused_state = b * h >= _parallel_programs(X.device)
    if fused_state:  # one pass over the sequence per (b, h, tile): enough programs to fill the GPU

        def fused_grid(meta):
            return triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(p, meta["BLOCK_P"]), b * h

        _state_scan_kernel[fused_grid](
            X, dt, A, B, init, a_cum, states, final, *dims, *strides, *init.stride(),
            HAS_INIT=initial_state is not None, DOT=dot, UPCAST=upcast,
        )  # fmt: skip
    else:  # few (b, h): every chunk's own state in parallel, then the short serial pass
        own = torch.empty(b, c, h, n, p, dtype=torch.float32, device=X.device)

        def state_grid(meta):
            return triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(p, meta["BLOCK_P"]), b * h, c

        _chunk_state_kernel[state_grid](
            X, dt, A, B, a_cum, own, *dims, *strides, DOT=dot, UPCAST=upcast, BLOCK_Q=next_pow2(chunk_size)
        )

        def passing_grid(meta):
            return triton.cdiv(n * p, meta["BLOCK"]), b * h

        _state_passing_kernel[passing_grid](
            own, a_cum, init, states, final, chunk_size, c, h, p, n, *init.stride(), HAS_INIT=initial_state is not None
        )

    def scan_grid(meta):
        return triton.cdiv(chunk_size, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]), b * h, c

    _chunk_scan_kernel[scan_grid](
        X, dt, B, C, states, a_cum, D if D is not None else A, Y, *dims, *strides, *C.stride(), *Y.stride(),
        HAS_D=D is not None, DOT=dot, UPCAST=upcast, BLOCK_N=next_pow2(n),
    )  # fmt: skip
    return Y, final
