"""Graph code for attention over the fixed-size ring-buffer cache (same math as
``edgeseq.reference.attention``): RoPE on the leading channels, keys written to slot
``position % W``, a mask from absolute positions, softmax over the ring (and, in prefill,
over the new tokens too). ``g`` is an ``edgeseq.export.builder.GraphBuilder``."""

from __future__ import annotations

import math

import numpy as np

INT_MAX = np.iinfo(np.int64).max


def rope(g, x: str, positions: str, theta: float, rot: int, head_dim: int) -> str:
    """x [..., pos axes, heads, d]; positions [...] int64 (x's leading axes without heads, d).

        angles = positions * inv_freq;  x_rot * cos + rotate_half(x_rot) * sin;  pass the rest
    """
    if rot == 0:
        return x
    inv_freq = (1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float32) / rot)).astype(np.float32)
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=1), g.ints(-1)), g.const(inv_freq))
    angles = g.op("Unsqueeze", g.op("Concat", angles, angles, axis=-1), g.ints(-2))  # [..., 1, rot]
    x_rot = g.op("Slice", x, g.ints(0), g.ints(rot), g.ints(-1))
    x1, x2 = g.op("Split", x_rot, g.ints(rot // 2, rot // 2), outputs=2, axis=-1)
    half_turn = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    rotated = g.op("Add", g.op("Mul", x_rot, g.op("Cos", angles)), g.op("Mul", half_turn, g.op("Sin", angles)))
    if rot == head_dim:
        return rotated
    return g.op("Concat", rotated, g.op("Slice", x, g.ints(rot), g.ints(INT_MAX), g.ints(-1)), axis=-1)


def kv_to_heads(g, t: str, q_per_kv: int, heads: int, head_dim: int) -> str:
    """[b, kv, s, d] -> [b, h, s, d]: query head j reads kv head j // q_per_kv."""
    if q_per_kv == 1:
        return t
    t = g.op("Unsqueeze", t, g.ints(2))  # [b, kv, 1, s, d]
    shape = g.op("Shape", t)
    b_kv = g.op("Slice", shape, g.ints(0), g.ints(2), g.ints(0))
    s = g.op("Slice", shape, g.ints(3), g.ints(4), g.ints(0))
    t = g.op("Expand", t, g.op("Concat", b_kv, g.ints(q_per_kv), s, g.ints(head_dim), axis=0))
    return g.op("Reshape", t, g.op("Concat", g.op("Slice", shape, g.ints(0), g.ints(1), g.ints(0)), g.ints(heads, -1, head_dim), axis=0))


def ring_positions(g, position: str, ring: int) -> tuple[str, str]:
    """position [b] tokens written -> slot positions [b, w] and their validity."""
    last = g.op("Unsqueeze", g.op("Sub", position, g.const(1, "int64")), g.ints(1))
    slots = g.const(np.arange(ring, dtype=np.int64))
    pos = g.op("Sub", last, g.op("Mod", g.op("Sub", last, slots), g.const(ring, "int64")))
    return pos, g.op("GreaterOrEqual", pos, g.const(0, "int64"))


def attention(g, config, heads: int, ring: int, window: int | None, w, p: str, x: str, past, position: str,
              mask: str | None, rank: int):
    """x [b,(t,)d] normed -> out, {"key": present, "value": present}; mask [b, t] (prefill).

        x -> q, k, v projections -> RoPE(q, k) at absolute positions
        step:    write k, v into slot position % W, attend over the ring (valid, in window)
        prefill: attend over [ring | new tokens] with a causal+window mask from absolute
                 positions (pads: no keys), then scatter the newest min(t, W) tokens into
                 their slots (a pad writes back what its slot holds)
    """
    a = config.attention
    H, Dh, r = heads, a.head_dim, a.q_per_kv
    KV, W = H // r, ring
    rot = round(a.head_dim * a.rope_fraction)

    def proj(name, n_heads):
        wt = g.weight(f"{p}{name}.weight.t", np.ascontiguousarray(w[f"{name}.weight"].T))
        b = g.weight(f"{p}{name}.bias", w[f"{name}.bias"]) if f"{name}.bias" in w else None
        shape = (0, n_heads, Dh) if rank == 2 else (0, 0, n_heads, Dh)
        return g.op("Reshape", g.linear(x, wt, b), g.ints(*shape))

    q, k, v = proj("q_proj", H), proj("k_proj", KV), proj("v_proj", KV)
    if rank == 2:
        o, key, value = _step(g, q, k, v, past, position, H, KV, Dh, r, W, window, a.rope_theta, rot)
        o = g.op("Reshape", o, g.ints(0, H * Dh))
    else:
        o, key, value = _prefill(g, q, k, v, past, position, mask, H, KV, Dh, r, W, window, a.rope_theta, rot)
        o = g.op("Reshape", o, g.ints(0, 0, H * Dh))
    wo = g.weight(f"{p}o_proj.weight.t", np.ascontiguousarray(w["o_proj.weight"].T))
    bo = g.weight(f"{p}o_proj.bias", w["o_proj.bias"]) if "o_proj.bias" in w else None
    return g.linear(o, wo, bo), {"key": key, "value": value}


def _softmax_attend(g, q, keys, values, visible, Dh):
    """q [b,h,t,d], keys/values [b,h,s,d], visible [b,1,t,s] -> [b,h,t,d]."""
    scores = g.op("Div", g.op("MatMul", q, g.op("Transpose", keys, perm=[0, 1, 3, 2])), g.const(math.sqrt(Dh)))
    scores = g.op("Where", visible, scores, g.const(-np.inf))
    return g.op("MatMul", g.op("Softmax", scores, axis=-1), values)


def _step(g, q, k, v, past, position, H, KV, Dh, r, W, window, theta, rot):
    """q [b,h,d], k/v [b,kv,d] -> o [b,h,d], caches [b,kv,w,d]."""
    q, k = rope(g, q, position, theta, rot, Dh), rope(g, k, position, theta, rot, Dh)
    slot = g.op("Mod", position, g.const(W, "int64"))
    write = g.op("Equal", g.op("Unsqueeze", slot, g.ints(1)), g.const(np.arange(W, dtype=np.int64)))  # [b, w]
    write = g.op("Unsqueeze", write, g.ints(1, 3))  # [b, 1, w, 1]
    key = g.op("Where", write, g.op("Unsqueeze", k, g.ints(2)), past["key"])
    value = g.op("Where", write, g.op("Unsqueeze", v, g.ints(2)), past["value"])
    slot_pos, valid = ring_positions(g, g.op("Add", position, g.const(1, "int64")), W)
    if window is not None:
        age = g.op("Sub", g.op("Unsqueeze", position, g.ints(1)), slot_pos)
        valid = g.op("And", valid, g.op("Less", age, g.const(window, "int64")))
    visible = g.op("Unsqueeze", valid, g.ints(1, 2))  # [b, 1, 1, w]
    o = _softmax_attend(g, g.op("Unsqueeze", q, g.ints(2)), kv_to_heads(g, key, r, H, Dh),
                        kv_to_heads(g, value, r, H, Dh), visible, Dh)
    return g.op("Squeeze", o, g.ints(2)), key, value


def _prefill(g, q, k, v, past, position, mask, H, KV, Dh, r, W, window, theta, rot):
    """q [b,t,h,d], k/v [b,t,kv,d], mask [b,t] -> o [b,t,h,d], caches [b,kv,w,d].

    A token's position counts the real tokens before it (position + CumSum(mask) - 1); a
    pad is no key, sees only itself (a finite, don't-care output) and writes no slot."""
    t = g.op("Shape", q, start=1, end=2)
    before = g.op("Sub", g.op("CumSum", mask, g.const(1, "int64")), g.const(1, "int64"))  # real tokens before
    new_pos = g.op("Add", g.op("Unsqueeze", position, g.ints(1)), before)  # [b, t]
    real = g.op("Cast", mask, to=9)  # bool [b, t]
    q, k = rope(g, q, new_pos, theta, rot, Dh), rope(g, k, new_pos, theta, rot, Dh)
    cached_pos, cached_valid = ring_positions(g, position, W)
    key_pos = g.op("Concat", cached_pos, new_pos, axis=1)  # [b, w+t]
    key_valid = g.op("Concat", cached_valid, real, axis=1)
    k_t, v_t = g.op("Transpose", k, perm=[0, 2, 1, 3]), g.op("Transpose", v, perm=[0, 2, 1, 3])  # [b, kv, t, d]
    keys = g.op("Concat", past["key"], k_t, axis=2)
    values = g.op("Concat", past["value"], v_t, axis=2)
    age = g.op("Sub", g.op("Unsqueeze", new_pos, g.ints(2)), g.op("Unsqueeze", key_pos, g.ints(1)))  # [b, t, w+t]
    visible = g.op("And", g.op("Unsqueeze", key_valid, g.ints(1)), g.op("GreaterOrEqual", age, g.const(0, "int64")))
    if window is not None:
        visible = g.op("And", visible, g.op("Less", age, g.const(window, "int64")))
    visible = g.op("Or", visible, _self_keys(g, t, W))
    o = _softmax_attend(g, g.op("Transpose", q, perm=[0, 2, 1, 3]), kv_to_heads(g, keys, r, H, Dh),
                        kv_to_heads(g, values, r, H, Dh), g.op("Unsqueeze", visible, g.ints(1)), Dh)
    # newest min(t, W) tokens into their slots; a pad writes back what its slot holds
    keep = g.op("Min", t, g.ints(W))
    first = g.op("Sub", t, keep)
    slots = g.op("Mod", g.op("Slice", new_pos, first, t, g.ints(1)), g.const(W, "int64"))  # [b, keep]
    k_new, v_new = (g.op("Slice", u, first, t, g.ints(2)) for u in (k_t, v_t))
    index = g.op("Expand", g.op("Unsqueeze", slots, g.ints(1, 3)), g.op("Shape", k_new))
    writes = g.op("Unsqueeze", g.op("Slice", real, first, t, g.ints(1)), g.ints(1, 3))  # [b, 1, keep, 1]
    k_new, v_new = (g.op("Where", writes, new, g.op("GatherElements", past[name], index, axis=2))
                    for new, name in ((k_new, "key"), (v_new, "value")))  # fmt: skip
    key = g.op("ScatterElements", past["key"], index, k_new, axis=2)
    value = g.op("ScatterElements", past["value"], index, v_new, axis=2)
    return g.op("Transpose", o, perm=[0, 2, 1, 3]), key, value


def _self_keys(g, t: str, W: int) -> str:
    """[t, w+t] bool: query i and key w+i, the token itself (a pad's one visible key)."""
    n = g.op("Squeeze", g.op("Add", t, g.ints(W)), g.ints(0))
    cols = g.op("Range", g.const(0, "int64"), n, g.const(1, "int64"))
    rows = g.op("Slice", cols, g.ints(W), g.ints(INT_MAX), g.ints(0))
    return g.op("Equal", g.op("Unsqueeze", rows, g.ints(1)), g.op("Unsqueeze", cols, g.ints(0)))
