"""The reference math checked against slower, independent formulations of itself."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeseq.reference import (
    attention_prefill_ref,
    attention_step_ref,
    causal_conv1d_ref,
    causal_conv1d_step_ref,
    gated_rmsnorm_ref,
    rope_ref,
    segsum,
    ssd_scan_ref,
    ssd_sequential_ref,
)

F64 = torch.float64


def _ssd_inputs(b, l, h, g, p, n, gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    X, B, C = r(b, l, h, p), r(b, l, g, n), r(b, l, g, n)
    dt = F.softplus(r(b, l, h) - 1)
    A = -torch.rand(h, generator=gen, dtype=F64) * 3 - 0.05
    return X, dt, A, B, C, r(h), r(b, h, n, p)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    chunk=st.sampled_from([2, 4, 8, 16]),
    l=st.integers(1, 70),
    heads_per_group=st.integers(1, 3),
    g=st.integers(1, 2),
    p=st.integers(1, 4),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    with_state=st.booleans(),
)
def test_chunked_scan_equals_recurrence(b, chunk, l, heads_per_group, g, p, n, seed, with_state):
    gen = torch.Generator().manual_seed(seed)
    X, dt, A, B, C, D, s0 = _ssd_inputs(b, l, heads_per_group * g, g, p, n, gen)
    s0 = s0 if with_state else None
    Y, S = ssd_scan_ref(X, dt, A, B, C, chunk, D=D, initial_state=s0)
    Y_seq, S_seq = ssd_sequential_ref(X, dt, A, B, C, D=D, initial_state=s0)
    assert _rel(Y, Y_seq) <= 1e-10
    assert _rel(S, S_seq) <= 1e-10


def test_scan_lengths_off_the_chunk_grid_include_non_multiples():
    """The property above must cover lengths that are not multiples of the chunk."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for l in (1, 7, 9, 63, 65):
        X, dt, A, B, C, D, s0 = _ssd_inputs(1, l, 4, 2, 3, 5, gen)
        Y, S = ssd_scan_ref(X, dt, A, B, C, 8, D=D, initial_state=s0)
        Y2, S2 = ssd_sequential_ref(X, dt, A, B, C, D=D, initial_state=s0)
        assert _rel(Y, Y2) <= 1e-10 and _rel(S, S2) <= 1e-10


def test_scan_splits_at_any_point():
    """Scanning [0, k) then [k, l) from the carried state equals one scan of [0, l)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    X, dt, A, B, C, D, s0 = _ssd_inputs(2, 45, 4, 1, 3, 5, gen)
    Y, S = ssd_scan_ref(X, dt, A, B, C, 8, D=D, initial_state=s0)
    for k in (1, 8, 13, 44):
        Y1, S1 = ssd_scan_ref(X[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], 8, D=D, initial_state=s0)
        Y2, S2 = ssd_scan_ref(X[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], 8, D=D, initial_state=S1)
        assert _rel(torch.cat([Y1, Y2], 1), Y) <= 1e-12 and _rel(S2, S) <= 1e-12


def test_scan_fp32_close_to_fp64():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    X, dt, A, B, C, D, s0 = _ssd_inputs(2, 200, 8, 2, 16, 16, gen)
    Y64, S64 = ssd_scan_ref(X, dt, A, B, C, 64, D=D, initial_state=s0)
    Y32, S32 = ssd_scan_ref(*(t.float() for t in (X, dt, A, B, C)), 64, D=D.float(), initial_state=s0.float())
    assert _rel(Y32.double(), Y64) <= 1e-5 and _rel(S32.double(), S64) <= 1e-5


def test_segsum_matches_direct_sums():
    a = torch.randn(3, 7, dtype=F64)
    out = segsum(a)
    for i in range(7):
        for j in range(7):
            want = a[:, j + 1 : i + 1].sum(-1) if i >= j else torch.full((3,), -math.inf, dtype=F64)
            torch.testing.assert_close(out[:, i, j], want, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(l=st.integers(1, 20), k=st.integers(1, 5), c=st.integers(1, 6), split=st.integers(0, 20), bias=st.booleans())
def test_conv_prefill_equals_steps_and_splits(l, k, c, split, bias):
    x = torch.randn(2, l, c, dtype=F64)
    w, b_ = torch.randn(c, k, dtype=F64), torch.randn(c, dtype=F64) if bias else None
    y, state = causal_conv1d_ref(x, w, b_)
    # the plain definition: zero-padded causal cross-correlation, then SiLU
    direct = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), w[:, None], b_, groups=c)).transpose(1, 2)
    torch.testing.assert_close(y, direct, rtol=0, atol=1e-12)
    s = torch.zeros(2, c, k - 1, dtype=F64)
    ys = []
    for t in range(l):
        yt, s = causal_conv1d_step_ref(x[:, t], s, w, b_)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, state, rtol=0, atol=0)
    m = min(split, l)
    y1, s1 = causal_conv1d_ref(x[:, :m], w, b_)
    y2, s2 = causal_conv1d_ref(x[:, m:], w, b_, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-12)


def test_gated_rmsnorm_groups():
    x, z = torch.randn(3, 12, dtype=F64), torch.randn(3, 12, dtype=F64)
    w = torch.randn(12, dtype=F64)
    out = gated_rmsnorm_ref(x, z, w, 1e-6, group_size=4)
    for g in range(3):
        s = slice(4 * g, 4 * g + 4)
        y = x[:, s] * F.silu(z[:, s])
        want = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w[s]
        torch.testing.assert_close(out[:, s], want, rtol=1e-12, atol=1e-12)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 8, dtype=F64), torch.randn(1, 1, 1, 8, dtype=F64)
    shift = int(torch.randint(1, 1000, ()))

    def score(pq, pk):
        rq = rope_ref(q, torch.tensor([[pq]]), 10000.0, 4)
        rk = rope_ref(k, torch.tensor([[pk]]), 10000.0, 4)
        return (rq * rk).sum()

    # angles are computed in fp32 as upstream does, so large positions carry ~1e-7 error
    torch.testing.assert_close(score(7, 3), score(7 + shift, 3 + shift), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4))
    torch.testing.assert_close(rope_ref(q, torch.tensor([[5]]), 10000.0, 4)[..., 4:], q[..., 4:])


def _dense_attention(q, k, v, window):
    """All tokens at once, no cache: the textbook masked softmax. q (b,l,h,d), k/v (b,l,kv,d)."""
    b, l, h, d = q.shape
    rep = h // k.size(2)
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    i, j = torch.arange(l)[:, None], torch.arange(l)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    return torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~visible, -math.inf).softmax(-1), v)


@settings(max_examples=25, deadline=None)
@given(
    l=st.integers(1, 30),
    window=st.sampled_from([None, 1, 3, 8]),
    kv=st.sampled_from([1, 2]),
    rep=st.sampled_from([1, 2]),
    splits=st.lists(st.integers(1, 9), max_size=4),
)
def test_attention_ring_cache_matches_dense(l, window, kv, rep, splits):
    b, d = 2, 4
    h = kv * rep
    ring = window if window is not None else 32
    q, k, v = torch.randn(b, l, h, d, dtype=F64), torch.randn(b, l, kv, d, dtype=F64), torch.randn(b, l, kv, d, dtype=F64)
    want = _dense_attention(q, k, v, window)
    empty = torch.zeros(b, kv, ring, d, dtype=F64)
    pos = torch.zeros(b, dtype=torch.long)
    # prefill in arbitrary pieces
    outs, kc, vc, t = [], empty, empty.clone(), 0
    for piece in [*splits, l]:
        piece = min(piece, l - t)
        if piece <= 0:
            break
        o, kc, vc = attention_prefill_ref(q[:, t : t + piece], k[:, t : t + piece], v[:, t : t + piece], kc, vc, pos + t, window)
        outs.append(o)
        t += piece
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-10, atol=1e-10)
    # one token at a time
    kc, vc, steps = empty, empty.clone(), []
    for t in range(l):
        o, kc, vc = attention_step_ref(q[:, t], k[:, t], v[:, t], kc, vc, pos + t, window)
        steps.append(o)
    torch.testing.assert_close(torch.stack(steps, 1), want, rtol=1e-10, atol=1e-10)
