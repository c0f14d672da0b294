"""The attention mixer as a torch module: q/k/v projections, RoPE, attention over the
ring-buffer cache (``edgeseq.reference.attention``), o_proj. The block hands every call
the parameters at the width it runs (``p``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from edgeseq.reference import attention_prefill_ref, attention_step_ref, rope_ref, token_positions

State = dict[str, Tensor]  # "key", "value" (b, kv_heads, W, head_dim)


class AttentionMixer(nn.Module):
    def __init__(self, config, heads: int, window: int | None):
        super().__init__()
        a = config.attention
        self.n_heads, self.q_per_kv, self.head_dim = heads, a.q_per_kv, a.head_dim
        self.window, self.theta = window, a.rope_theta
        self.rot_dim = round(a.head_dim * a.rope_fraction)
        kv = self.n_heads // a.q_per_kv
        self.q_proj = nn.Linear(config.d_model, self.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * a.head_dim, config.d_model, bias=a.out_bias)

    def _qkv(self, p: dict[str, Tensor], u: Tensor, positions: Tensor):
        """u (b, l, d); positions (b, l) -> rotated q (b, l, h, d), k (b, l, k, d), v."""
        q, k, v = (
            F.linear(u, p[f"{n}.weight"], p.get(f"{n}.bias")).unflatten(-1, (-1, self.head_dim))
            for n in ("q_proj", "k_proj", "v_proj")
        )
        return rope_ref(q, positions, self.theta, self.rot_dim), rope_ref(k, positions, self.theta, self.rot_dim), v

    def forward(self, p: dict[str, Tensor], u: Tensor, state: State, position: Tensor, kept: int,
                mask: Tensor | None = None):  # fmt: skip
        """u (b, l, d) -> (b, l, d), new state; a prompt attends to the cache and itself.
        mask (b, l) or None: 0 marks a left pad, never seen nor cached."""
        q, k, v = self._qkv(p, u, token_positions(position, u.size(1), mask))
        sd = state["key"].dtype
        o, key, value = attention_prefill_ref(
            q.to(sd), k.to(sd), v.to(sd), state["key"], state["value"], position, self.window, mask
        )
        out = F.linear(o.flatten(-2).to(u.dtype), p["o_proj.weight"], p.get("o_proj.bias"))
        return out, {"key": key, "value": value}

    def step(self, p: dict[str, Tensor], u: Tensor, state: State, position: Tensor, kept: int):
        """u (b, d) -> (b, d), new state."""
        q, k, v = (t[:, 0] for t in self._qkv(p, u[:, None], position[:, None]))
        sd = state["key"].dtype
        o, key, value = attention_step_ref(q.to(sd), k.to(sd), v.to(sd), state["key"], state["value"], position,
                                           self.window)  # fmt: skip
        out = F.linear(o.flatten(-2).to(u.dtype), p["o_proj.weight"], p.get("o_proj.bias"))
        return out, {"key": key, "value": value}
