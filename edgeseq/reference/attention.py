"""Causal attention over a fixed-size ring-buffer cache (sliding window or global).

Axes: b batch, l new tokens, w ring slots, h query heads, k kv heads, d head dim.
The cache holds keys (already rotated) and values of the last W tokens in slots
``position % W``; ``position`` (b,) counts the tokens a stream has consumed. A sliding
layer attends to its last W tokens; a global layer has W = its longest stream, so the
cache shape is fixed either way and decode memory does not grow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _expand_kv(t: Tensor, n_heads: int) -> Tensor:
    """(b, k, ..., d) -> (b, h, ..., d): query head j reads kv head j // (h / k)."""
    return t.repeat_interleave(n_heads // t.size(1), dim=1)


def ring_positions(position: Tensor, ring: int) -> tuple[Tensor, Tensor]:
    """Absolute position held by each slot once ``position`` tokens were written.

    position (b,) -> positions (b, w) and valid (b, w): slot s holds the newest token t
    with t % w == s and t < position.
    """
    slots = torch.arange(ring, device=position.device)
    last = position[:, None] - 1
    pos = last - torch.remainder(last - slots, ring)
    return pos, pos >= 0


def token_positions(position: Tensor, length: int, mask: Tensor | None = None) -> Tensor:
    """Absolute positions of ``length`` new tokens: position (b,), mask (b, l) or None -> (b, l).

    A token's position counts only the real tokens before it: position + cumsum(mask) - 1.
    A left pad gets the position of the token before it (position - 1 at the start).
    """
    if mask is None:
        return position[:, None] + torch.arange(length, device=position.device)
    return position[:, None] + mask.cumsum(1) - 1


def attention_prefill_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    position: Tensor,
    window: int | None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of l new tokens over the cached tokens and themselves.

    q (b, l, h, d); k, v (b, l, k, d) rotated at ``token_positions``; key_cache,
    value_cache (b, k, w, d); position (b,). window: attend to the last ``window`` tokens
    (None: all cached ones). mask (b, l) or None: 0 marks a left pad, invisible as a key
    and never written to the cache (a pad query sees only itself: its output is finite
    and meaningless).
    Returns out (b, l, h, d) and the updated caches (b, k, w, d).
    """
    b, l, h, d = q.shape
    ring = key_cache.size(2)
    # 1. every key the new tokens may see: cached slots, then the new tokens
    cached_pos, cached_valid = ring_positions(position, ring)  # (b, w)
    new_pos = token_positions(position, l, mask)  # (b, l)
    key_pos = torch.cat([cached_pos, new_pos], dim=1)  # (b, w+l)
    new_valid = torch.ones_like(new_pos, dtype=torch.bool) if mask is None else mask.bool()
    key_valid = torch.cat([cached_valid, new_valid], dim=1)
    keys = torch.cat([key_cache.to(k.dtype), k.transpose(1, 2)], dim=2)  # (b, k, w+l, d)
    values = torch.cat([value_cache.to(v.dtype), v.transpose(1, 2)], dim=2)
    # 2. causal and window masks from absolute positions
    age = new_pos[:, :, None] - key_pos[:, None, :]  # (b, l, w+l)
    visible = key_valid[:, None, :] & (age >= 0)
    if window is not None:
        visible &= age < window
    if mask is not None:  # every query sees itself: a pad row of the softmax is not all -inf
        i = torch.arange(ring + l, device=q.device)
        visible |= i[None, :] == i[ring:, None]  # (l, w+l): query t and key w+t
    # 3. softmax attention with kv heads shared by their query groups
    scores = torch.einsum("blhd,bhjd->bhlj", q, _expand_kv(keys, h)) / math.sqrt(d)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.einsum("bhlj,bhjd->blhd", scores.softmax(-1), _expand_kv(values, h))
    # 4. write the newest min(l, w) tokens into their slots; a pad writes back what its slot holds
    keep = min(l, ring)
    slots = torch.remainder(new_pos[:, l - keep :], ring)  # (b, keep)
    index = slots[:, None, :, None].expand(-1, key_cache.size(1), -1, d)
    k_new = k[:, l - keep :].transpose(1, 2).to(key_cache.dtype)
    v_new = v[:, l - keep :].transpose(1, 2).to(value_cache.dtype)
    if mask is not None:
        real = mask[:, None, l - keep :, None].bool()  # (b, 1, keep, 1)
        k_new = torch.where(real, k_new, key_cache.gather(2, index))
        v_new = torch.where(real, v_new, value_cache.gather(2, index))
    key_cache = key_cache.scatter(2, index, k_new)
    value_cache = value_cache.scatter(2, index, v_new)
    return out, key_cache, value_cache


def attention_step_ref(
    q: Tensor, k: Tensor, v: Tensor, key_cache: Tensor, value_cache: Tensor, position: Tensor, window: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """One token per stream: write it into its slot, then attend over the ring.

    q (b, h, d); k, v (b, k, d); caches (b, k, w, d); position (b,) before this token.
    Returns out (b, h, d) and the updated caches.
    """
    b, h, d = q.shape
    ring = key_cache.size(2)
    write = torch.nn.functional.one_hot(torch.remainder(position, ring), ring).to(torch.bool)  # (b, w)
    write = write[:, None, :, None]
    key_cache = torch.where(write, k[:, :, None, :].to(key_cache.dtype), key_cache)
    value_cache = torch.where(write, v[:, :, None, :].to(value_cache.dtype), value_cache)
    slot_pos, valid = ring_positions(position + 1, ring)
    if window is not None:
        valid &= position[:, None] - slot_pos < window
    scores = torch.einsum("bhd,bhwd->bhw", q, _expand_kv(key_cache.to(q.dtype), h)) / math.sqrt(d)
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    out = torch.einsum("bhw,bhwd->bhd", scores.softmax(-1), _expand_kv(value_cache.to(q.dtype), h))
    return out, key_cache, value_cache
