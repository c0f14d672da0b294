"""The SSD scan and step in basic ONNX ops (the portable flavor's core).

Same math as ``edgeseq.reference.ssd`` (see there for the derivation): dense products
inside chunks of Q tokens, a small decay-weighted product across chunk boundaries. Only
MatMul, CumSum, Exp, Where, Reshape, Transpose, Pad and friends: opset <= 18, no Einsum,
no loop, so mobile EPs and TensorRT's parser take it.

Shapes: b batch, t tokens, c chunks, q/s positions in a chunk, h heads, n state, p head
channels. A and D are constants of the graph. ``g`` is an ``edgeseq.export.builder.GraphBuilder``.
"""

from __future__ import annotations

import numpy as np


def heads_from_groups(g, M: str, groups: int, heads: int, n: int, axis: int) -> str:
    """M [..., G, N] (groups on ``axis``) -> [..., H, N]: head j reads group j // (H/G)."""
    if groups == heads:
        return M
    per = heads // groups
    M = g.op("Unsqueeze", M, g.ints(axis + 1))  # [..., G, 1, N]
    target = g.op("Concat", g.op("Shape", M, end=axis + 1), g.ints(per, n), axis=0)
    return g.op("Reshape", g.op("Expand", M, target), g.op("Concat", g.op("Shape", M, end=axis), g.ints(heads, n), axis=0))


def segsum_exp(g, a: str, size: str) -> str:
    """exp(segsum(a)): a [..., s] -> [..., s, s], entry (i, j) = exp(a[j+1] + ... + a[i])
    for i >= j and 0 above the diagonal. ``size`` is s as a 1-element int64 tensor.

        a --Unsqueeze/Expand--> [..., i, j] = a[i] --Where(i > j, ., 0)--> CumSum over i
          --Where(i >= j, ., -inf)--> Exp
    """
    idx = g.op("Range", g.const(0, "int64"), g.op("Squeeze", size, g.ints(0)), g.const(1, "int64"))
    rows, cols = g.op("Unsqueeze", idx, g.ints(1)), g.op("Unsqueeze", idx, g.ints(0))
    strict, lower = g.op("Greater", rows, cols), g.op("GreaterOrEqual", rows, cols)
    grid = g.op("Expand", g.op("Unsqueeze", a, g.ints(-1)), g.op("Concat", g.op("Shape", a), size, axis=0))
    sums = g.op("CumSum", g.op("Where", strict, grid, g.const(0.0)), g.const(-2, "int64"))
    return g.op("Exp", g.op("Where", lower, sums, g.const(-np.inf)))


def ssd_scan(g, X, dt, A, B, C, D, s0, *, heads, groups, headdim, d_state, chunk) -> tuple[str, str]:
    """X [b,t,h,p], dt [b,t,h], B/C [b,t,g,n], s0 [b,h,n,p]; A, D numpy [h] -> Y [b,t,h,p], S [b,h,n,p].

        X, dt, B, C --pad t to c*Q--> chunks [b,h,c,q,.]
           a = dt*A, a_cum = CumSum(a)
           Y_diag  = ((C B^T) * exp(segsum a)) (dt X)                 inside chunks
           S_chunk = (B * exp(a_cum[-1] - a_cum))^T (dt X)             each chunk's own state
           states  = exp(segsum [0, a_cum[-1] ...]) [s0, S_chunk]      across chunks
           Y_off   = (C states_entering) * exp(a_cum)
        Y = Y_diag + Y_off, unchunked, cut to t, + D X;  S = states[-1]
    """
    H, P, N, Q = heads, headdim, d_state, chunk
    t = g.op("Shape", X, start=1, end=2)  # [1]
    Qc = g.ints(Q)
    pad = g.op("Mod", g.op("Sub", Qc, g.op("Mod", t, Qc)), Qc)
    z3, z2 = g.ints(0, 0, 0, 0, 0), g.ints(0, 0)
    pads4 = g.op("Concat", z3, pad, z2, axis=0)  # rank 4: pad the end of axis 1
    pads3 = g.op("Concat", g.ints(0, 0, 0, 0), pad, g.ints(0), axis=0)
    Xp, Bp, Cp = (g.op("Pad", v, pads4) for v in (X, B, C))
    dtp = g.op("Pad", dt, pads3)
    # 1. chunks, heads first: [b, h, c, q, .]
    Xc = g.op("Transpose", g.reshape(Xp, 0, -1, Q, H, P), perm=[0, 3, 1, 2, 4])
    dtc = g.op("Transpose", g.reshape(dtp, 0, -1, Q, H), perm=[0, 3, 1, 2])
    Bh = heads_from_groups(g, g.reshape(Bp, 0, -1, Q, groups, N), groups, H, N, axis=3)
    Ch = heads_from_groups(g, g.reshape(Cp, 0, -1, Q, groups, N), groups, H, N, axis=3)
    Bc = g.op("Transpose", Bh, perm=[0, 3, 1, 2, 4])
    Cc = g.op("Transpose", Ch, perm=[0, 3, 1, 2, 4])
    a = g.op("Mul", dtc, g.const(A.reshape(H, 1, 1)))  # [b, h, c, q]
    a_cum = g.op("CumSum", a, g.const(-1, "int64"))
    Xdt = g.op("Mul", Xc, g.op("Unsqueeze", dtc, g.ints(-1)))
    # 2. inside chunks
    L = segsum_exp(g, a, Qc)  # [b, h, c, q, s]
    CB = g.op("MatMul", Cc, g.op("Transpose", Bc, perm=[0, 1, 2, 4, 3]))
    Y_diag = g.op("MatMul", g.op("Mul", CB, L), Xdt)
    # 3. each chunk's contribution to the state at its end
    a_last = g.op("Slice", a_cum, g.ints(-1), g.ints(np.iinfo(np.int64).max), g.ints(-1))  # [b, h, c, 1]
    decay_to_end = g.op("Exp", g.op("Sub", a_last, a_cum))
    weighted_B = g.op("Mul", Bc, g.op("Unsqueeze", decay_to_end, g.ints(-1)))
    S_chunk = g.op("MatMul", g.op("Transpose", weighted_B, perm=[0, 1, 2, 4, 3]), Xdt)  # [b, h, c, n, p]
    # 4. across chunk boundaries, from the initial state
    S_all = g.op("Concat", g.op("Unsqueeze", s0, g.ints(2)), S_chunk, axis=2)  # [b, h, c+1, n, p]
    chunk_a = g.op("Pad", g.op("Squeeze", a_last, g.ints(-1)), g.ints(0, 0, 1, 0, 0, 0))  # [b, h, c+1]
    c1 = g.op("Shape", chunk_a, start=2, end=3)
    decay = segsum_exp(g, chunk_a, c1)  # [b, h, c+1, c+1]
    states = g.op("MatMul", decay, g.reshape(S_all, 0, 0, -1, N * P))
    states = g.reshape(states, 0, 0, -1, N, P)
    entering = g.op("Slice", states, g.ints(0), g.ints(-1), g.ints(2))
    final = g.op("Squeeze", g.op("Slice", states, g.ints(-1), g.ints(np.iinfo(np.int64).max), g.ints(2)), g.ints(2))
    # 5. read the entering state out at every position
    Y_off = g.op("Mul", g.op("MatMul", Cc, entering), g.op("Unsqueeze", g.op("Exp", a_cum), g.ints(-1)))
    # 6. undo chunking, cut the padding, add the skip
    Y = g.op("Transpose", g.op("Add", Y_diag, Y_off), perm=[0, 2, 3, 1, 4])  # [b, c, q, h, p]
    Y = g.op("Slice", g.reshape(Y, 0, -1, H, P), g.ints(0), t, g.ints(1))
    Y = g.op("Add", Y, g.op("Mul", X, g.const(D.reshape(H, 1))))
    return Y, final


def ssd_step(g, x, dt, A, B, C, D, state, *, heads, groups, headdim, d_state) -> tuple[str, str]:
    """x [b,h,p], dt [b,h], B/C [b,g,n], state [b,h,n,p]; A, D numpy [h] -> y [b,h,p], state.

        state' = exp(dt A) state + B^T (dt x);   y = C state' + D x
    """
    H, N = heads, d_state
    Bh = heads_from_groups(g, B, groups, H, N, axis=1)  # [b, h, n]
    Ch = heads_from_groups(g, C, groups, H, N, axis=1)
    decay = g.op("Exp", g.op("Mul", dt, g.const(A)))  # [b, h]
    dtx = g.op("Mul", x, g.op("Unsqueeze", dt, g.ints(-1)))  # [b, h, p]
    kept = g.op("Mul", state, g.op("Unsqueeze", decay, g.ints(2, 3)))
    added = g.op("Mul", g.op("Unsqueeze", Bh, g.ints(3)), g.op("Unsqueeze", dtx, g.ints(2)))
    new_state = g.op("Add", kept, added)
    y = g.op("Squeeze", g.op("MatMul", g.op("Unsqueeze", Ch, g.ints(2)), new_state), g.ints(2))
    y = g.op("Add", y, g.op("Mul", x, g.const(D.reshape(H, 1))))
    return y, new_state
