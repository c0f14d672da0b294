"""The SSD (Mamba2) scan: chunked for prefill, one token at a time for decode.

Axes, used the same way everywhere: b batch, l sequence, c chunk, q/s positions in a
chunk, h heads, g B/C groups, p head channels (P), n state size (N).

Per head, with a_t = exp(dt_t * A) the scalar decay, the recurrence is

    S_t = a_t * S_{t-1} + B_t^T (dt_t * x_t)        S: (n, p)
    y_t = C_t S_t + D * x_t

and the chunked form computes the same thing as dense work inside chunks plus a short
recurrence across chunk boundaries (Dao & Gu 2024, "Transformers are SSMs", sec. 6).
The state layout (b, h, n, p) is the key-by-value layout of linear attention.

Where this departs from the paper's listing: inputs are X and dt separately (not X*dt),
sequences of any length are padded inside with dt = 0 (no decay, no input, so the final
state is exact), and D is applied here so a scan is a whole SSM output. The same dt = 0
is how a caller skips a token (a left pad of a batch): the state passes it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def segsum(a: Tensor) -> Tensor:
    """a (..., t) -> (..., t, t): out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above.

    Built from masked cumulative sums rather than a difference of cumsums, so that no
    large terms cancel.
    """
    t = a.size(-1)
    a = a[..., None].expand(*a.shape, t)  # (..., i, j) holds a[i]
    strictly_lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(a.masked_fill(~strictly_lower, 0), dim=-2)  # sum of a[k] for j < k <= i
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~lower, float("-inf"))


def heads_from_groups(M: Tensor, n_heads: int, dim: int) -> Tensor:
    """Repeat a per-group tensor along ``dim`` so head h reads group h // (n_heads / g)."""
    return M.repeat_interleave(n_heads // M.size(dim), dim=dim)


def ssd_scan_ref(
    X: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan.

    X (b, l, h, p); dt (b, l, h) after softplus; A (h,) negative; B, C (b, l, g, n);
    D (h,) or None; initial_state (b, h, n, p) or None.
    Returns Y (b, l, h, p) and the final state (b, h, n, p), both in X's dtype.
    """
    b, l, h, p = X.shape
    n = B.size(-1)
    q = min(chunk_size, max(l, 1))  # a call shorter than a chunk is one chunk of its length, not padded
    pad = (-l) % q
    # 0. pad to whole chunks with dt = 0: no decay and no input, the state passes through
    if pad:
        X, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (X, dt, B, C))
    c = X.size(1) // q
    # 1. split into chunks and give every head its B/C group
    Xc = X.reshape(b, c, q, h, p)
    dtc = dt.reshape(b, c, q, h)
    Bc = heads_from_groups(B.reshape(b, c, q, -1, n), h, dim=3)  # (b, c, q, h, n)
    Cc = heads_from_groups(C.reshape(b, c, q, -1, n), h, dim=3)
    Xdt = Xc * dtc[..., None]  # the input term dt * x
    a = (dtc * A).permute(0, 3, 1, 2)  # (b, h, c, q) log-decay per step
    a_cum = torch.cumsum(a, dim=-1)
    # 2. inside each chunk: attention-like dense product with the decay mask L
    L = torch.exp(segsum(a))  # (b, h, c, q, s)
    Y_diag = torch.einsum("bcqhn,bcshn,bhcqs,bcshp->bcqhp", Cc, Bc, L, Xdt)
    # 3. each chunk's own contribution to the state at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, q)
    chunk_states = torch.einsum("bcqhn,bhcq,bcqhp->bchnp", Bc, decay_to_end, Xdt)
    # 4. recurrence across chunk boundaries, starting from the initial state
    if initial_state is None:
        initial_state = torch.zeros(b, h, n, p, dtype=X.dtype, device=X.device)
    chunk_states = torch.cat([initial_state[:, None].to(X.dtype), chunk_states], dim=1)  # (b, c+1, h, n, p)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchnp->bzhnp", chunk_decay, chunk_states)
    states, final_state = states[:, :-1], states[:, -1]  # state entering each chunk; after the last
    # 5. the state entering a chunk, decayed to each position and read out by C
    decay_from_start = torch.exp(a_cum)  # (b, h, c, q)
    Y_off = torch.einsum("bcqhn,bchnp,bhcq->bcqhp", Cc, states, decay_from_start)
    # 6. sum, undo the chunking, drop the padding, add the skip
    Y = (Y_diag + Y_off).reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        Y = Y + X[:, :l] * D[:, None].to(X.dtype)
    return Y, final_state


def ssd_step_ref(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One token of the recurrence.

    state (b, h, n, p); x (b, h, p); dt (b, h) after softplus; A (h,); B, C (b, g, n);
    D (h,) or None. Returns y (b, h, p) and the new state (b, h, n, p), in state's dtype.
    """
    h = x.size(1)
    x, dt, B, C = (t.to(state.dtype) for t in (x, dt, B, C))
    Bh = heads_from_groups(B, h, dim=1)  # (b, h, n)
    Ch = heads_from_groups(C, h, dim=1)
    decay = torch.exp(dt * A.to(state.dtype))  # (b, h)
    state = state * decay[..., None, None] + Bh[..., :, None] * (dt[..., None] * x)[..., None, :]
    y = (Ch[:, :, None, :] @ state)[:, :, 0, :]  # C_t S_t per head: (b, h, 1, n) @ (b, h, n, p)
    if D is not None:
        y = y + x * D[:, None].to(state.dtype)
    return y, state


def ssd_sequential_ref(
    X: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence token by token; same shapes as ``ssd_scan_ref``. The slow oracle."""
    b, l, h, p = X.shape
    state = initial_state
    if state is None:
        state = torch.zeros(b, h, B.size(-1), p, dtype=X.dtype, device=X.device)
    ys = []
    for t in range(l):
        y, state = ssd_step_ref(state, X[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    Y = torch.stack(ys, dim=1) if ys else X.new_zeros(b, 0, h, p)
    return Y, state
