"""The states entering the chunks of the SSD scan (the reference's steps 3 and 4), beside
their twin; ``edgeseq.kernels.ssd_scan`` reads them out. Two ways, same result:

    fused (launch 1 of 2):    X, dt, A, B --[_state_scan: steps 3+4, one pass per (b, h, tile)]-->
                              a_cum (b, h, c*q), S (b, c, h, n, p), final (b, h, n, p)
    split (launches 1-2 of 3): X, dt, A, B --[_chunk_state: step 3, every chunk at once]-->
                              a_cum, OWN (b, c, h, n, p) each chunk's own end state (fp32)
                              OWN, a_cum --[_state_passing: step 4, serial over chunks]--> S, final

a_cum is the log-decay since the chunk's start; S holds the state entering each chunk in
X's dtype (it only feeds C's products, which round it so anyway); the state itself and
``final`` stay fp32. The fused pass needs b*h programs to fill the GPU; with few (b, h)
the split's parallel first launch wins (``chunk_states`` chooses).
"""

import torch
from torch import Tensor

from edgeseq.kernels._common import FP32_DOT, KEY, configs, dot, prune
from edgeseq.kernels._triton import interpreting, next_pow2, tl, triton
from edgeseq.reference import ssd_scan_ref as _scan_math

_STATE_NAMES, _STATE_TILES = ("BLOCK_N", "BLOCK_P", "BLOCK_K"), [
    ((64, 32, 32), 4, 3), ((64, 64, 32), 4, 3), ((64, 64, 64), 4, 2),
    ((128, 32, 64), 8, 2), ((128, 64, 32), 8, 3), ((128, 64, 64), 8, 2),
]  # fmt: skip
_FUSED_TILES = [
    ((32, 32, 64), 4, 3), ((32, 64, 64), 4, 3), ((64, 32, 64), 4, 3),
    ((64, 64, 32), 4, 4), ((64, 64, 64), 4, 3), ((128, 64, 64), 8, 2),
]  # fmt: skip


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
        _, state = _scan_math(X[:, piece], dt[:, piece], A, B[:, piece], B[:, piece], chunk_size, None, state)
    return torch.cat(a_cum, -1).contiguous(), torch.stack(entering, 1).contiguous(), state


@triton.jit
def _block_inputs(X, DT, B, start, offs_k, offs_n, offs_p, seqlen, chunk_size, headdim, dstate,
                  sx_l, sx_p, sdt_l, sb_l, sb_n):  # fmt: skip
    """Steps ``offs_k`` of the chunk at ``start``: dt (fp32, 0 where masked: no decay, no
    input), X (BLOCK_K, BLOCK_P) and B transposed through its strides (BLOCK_N, BLOCK_K)."""
    valid_k = (offs_k < chunk_size) & (start + offs_k < seqlen)
    dt_k = tl.load(DT + (start + offs_k) * sdt_l, mask=valid_k, other=0.0).to(tl.float32)
    x = tl.load(
        X + (start + offs_k)[:, None] * sx_l + offs_p[None, :] * sx_p,
        mask=valid_k[:, None] & (offs_p[None, :] < headdim),
        other=0.0,
    )
    Bt = tl.load(B + offs_n[:, None] * sb_n + (start + offs_k)[None, :] * sb_l,
                 mask=(offs_n[:, None] < dstate) & valid_k[None, :], other=0.0)  # fmt: skip
    return dt_k, x, Bt


@triton.autotune(configs(_STATE_NAMES, _STATE_TILES), key=KEY, prune_configs_by={"early_config_prune": prune})
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
        dt_k, x, Bt = _block_inputs(X, DT, B, start, offs_k, offs_n, offs_p, seqlen, chunk_size, headdim, dstate,
                                    sx_l, sx_p, sdt_l, sb_l, sb_n)  # fmt: skip
        a_k = a_before + tl.cumsum(dt_k * A_h, axis=0)
        a_before += tl.sum(dt_k * A_h)
        tl.store(ACUM + pid_bh * nchunks * chunk_size + start + offs_k, a_k, mask=(offs_k < chunk_size) & (pid_np == 0))
        w = tl.exp(a_end - a_k) * dt_k
        acc = dot(Bt, (x.to(tl.float32) * w[:, None]).to(Bt.dtype), acc, DOT, UPCAST)
    S += ((b * nchunks + pid_c) * nheads + h) * dstate * headdim
    tl.store(
        S + offs_n[:, None] * headdim + offs_p[None, :],
        acc,
        mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < headdim),
    )


def _passingconfigs():
    if interpreting():
        return [triton.Config({"BLOCK": 256}, num_warps=1)]
    return [triton.Config({"BLOCK": block}, num_warps=w) for block, w in ((256, 2), (512, 4), (1024, 4), (2048, 8))]


@triton.autotune(_passingconfigs(), key=["headdim", "dstate", "nheads"])
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
    configs(_STATE_NAMES, _FUSED_TILES), key=[*KEY, "nheads"], prune_configs_by={"early_config_prune": prune}
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
        dt_k, x, Bt = _block_inputs(X, DT, B, start, offs_k, offs_n, offs_p, seqlen, chunk_size, headdim, dstate,
                                    sx_l, sx_p, sdt_l, sb_l, sb_n)  # fmt: skip
        a_k = a_run + tl.cumsum(dt_k * A_h, axis=0)
        a_next = a_run + tl.sum(dt_k * A_h)
        tl.store(ACUM + (pid_bh * nchunks + c) * chunk_size + offs_k, a_k, mask=(offs_k < chunk_size) & (pid_np == 0))
        w = tl.exp(a_next - a_k) * dt_k
        state = dot(Bt, (x.to(tl.float32) * w[:, None]).to(Bt.dtype), state * tl.exp(a_next - a_run), DOT, UPCAST)
        a_run = a_next
    tl.store(FINAL + pid_bh * dstate * headdim + tile, state, mask=mask_np)


# ---- entry points for TensorRT plugins (edgeseq.kernels.aot compiles them to PTX) ----------
# TensorRT launches an AOT plugin kernel with (input pointers, int32 scalars, output pointers);
# tensors are contiguous, the model's sizes are constexprs baked into the PTX, and the only
# scalar is the sequence length. They run the same kernel bodies as the launchers above.
_state_scan_body = getattr(_state_scan_kernel, "fn", _state_scan_kernel)  # the jit function under the autotuner


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


def _parallel_programs(device: torch.device) -> int:
    """Batch x heads from which the fused state pass fills the GPU (its SM count)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter: the three-launch path unless asked
    return torch.cuda.get_device_properties(device).multi_processor_count


def chunk_states(X, dt, A, B, chunk_size: int, initial_state, final: Tensor, fused_state: bool | None = None):
    """a_cum (b, h, c*q) fp32 and S (b, c, h, n, p) in X's dtype; writes the final state into
    ``final`` (b, h, n, p) fp32. Shapes and dtypes as ``ssd_scan``; fused_state None chooses."""
    b, l, h, p = X.shape
    g, n = B.shape[2:]
    c = triton.cdiv(l, chunk_size)
    a_cum = torch.empty(b, h, c * chunk_size, dtype=torch.float32, device=X.device)
    dims = (l, chunk_size, h, h // g, p, n)  # seqlen, chunk_size, nheads, heads_per_group, headdim, dstate
    strides = (*X.stride(), *dt.stride(), *B.stride())
    precision = FP32_DOT if X.dtype == torch.float32 else "tf32"  # moot for half operands
    upcast = interpreting() and X.dtype == torch.bfloat16
    init = initial_state if initial_state is not None else final  # a placeholder pointer when absent
    states = torch.empty(b, c, h, n, p, dtype=X.dtype, device=X.device)
    if fused_state is None:
        fused_state = b * h >= _parallel_programs(X.device)
    if fused_state:  # one pass over the sequence per (b, h, tile): enough programs to fill the GPU

        def fused_grid(meta):
            return triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(p, meta["BLOCK_P"]), b * h

        _state_scan_kernel[fused_grid](
            X, dt, A, B, init, a_cum, states, final, *dims, *strides, *init.stride(),
            HAS_INIT=initial_state is not None, DOT=precision, UPCAST=upcast,
        )  # fmt: skip
    else:  # few (b, h): every chunk's own state in parallel, then the short serial pass
        own = torch.empty(b, c, h, n, p, dtype=torch.float32, device=X.device)

        def state_grid(meta):
            return triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(p, meta["BLOCK_P"]), b * h, c

        _chunk_state_kernel[state_grid](
            X, dt, A, B, a_cum, own, *dims, *strides, DOT=precision, UPCAST=upcast, BLOCK_Q=next_pow2(chunk_size)
        )

        def passing_grid(meta):
            return triton.cdiv(n * p, meta["BLOCK"]), b * h

        _state_passing_kernel[passing_grid](
            own, a_cum, init, states, final, chunk_size, c, h, p, n, *init.stride(), HAS_INIT=initial_state is not None
        )

    return a_cum, states
