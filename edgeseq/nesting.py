"""Which rows and columns of each weight a nested width keeps.

The model at a width (training, evaluation) and ``extract`` (deployment) both slice
through these functions, so the two cannot disagree.

Mamba2 (MatMamba): the inner width is nested per head — z and x channels, dt, dt_bias,
A_log, D and the norm weight follow the kept heads, while B, C (all groups), d_state and
d_conv stay whole. With G groups, each group keeps its leading heads, so every head keeps
the B/C group it was trained with. Attention keeps whole kv groups (a kv head with its
query heads). A gated MLP keeps its leading hidden units (MatFormer).
"""

from __future__ import annotations

import torch
from torch import Tensor


def kept_heads(n_heads: int, n_groups: int, kept: int) -> Tensor:
    """Indices of the kept heads: the leading kept/G heads of each of G contiguous groups."""
    per_group, keep = n_heads // n_groups, kept // n_groups
    return (torch.arange(n_groups)[:, None] * per_group + torch.arange(keep)[None, :]).flatten()


def head_channels(heads: Tensor, head_dim: int) -> Tensor:
    """Channel indices of the given heads, head-major."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def mamba2_index(n_heads: int, n_groups: int, headdim: int, d_state: int, kept: int) -> dict[str, Tensor]:
    """Index tensors per Mamba2 parameter for ``kept`` of ``n_heads`` heads.

    in_proj rows are laid out [z (d_inner) | x (d_inner) | B (G*N) | C (G*N) | dt (H)];
    the conv runs over [x | B | C].
    """
    d_inner, bc = n_heads * headdim, 2 * n_groups * d_state
    heads = kept_heads(n_heads, n_groups, kept)
    inner = head_channels(heads, headdim)
    bc_rows = torch.arange(bc)
    conv = torch.cat([inner, d_inner + bc_rows])
    in_proj = torch.cat([inner, d_inner + conv, 2 * d_inner + bc + heads])
    return {"heads": heads, "inner": inner, "conv": conv, "in_proj": in_proj}


def slice_mamba2(params: dict[str, Tensor], index: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mixer parameters (names as in ``Mamba2Mixer``) restricted to the kept heads."""
    rows = {
        "in_proj.weight": "in_proj",
        "in_proj.bias": "in_proj",
        "conv1d.weight": "conv",
        "conv1d.bias": "conv",
        "dt_bias": "heads",
        "A_log": "heads",
        "D": "heads",
        "norm.weight": "inner",
    }
    out = {}
    for name, t in params.items():
        if name in rows:
            out[name] = t.index_select(0, index[rows[name]].to(t.device))
        elif name == "out_proj.weight":
            out[name] = t.index_select(1, index["inner"].to(t.device))
        else:  # out_proj.bias is per d_model and stays whole
            out[name] = t
    return out


def attention_index(n_heads: int, q_per_kv: int, head_dim: int, kept: int) -> dict[str, Tensor]:
    """Rows of q, k/v for the leading ``kept`` query heads (a multiple of q_per_kv)."""
    q = head_channels(torch.arange(kept), head_dim)
    kv = head_channels(torch.arange(kept // q_per_kv), head_dim)
    return {"q": q, "kv": kv}


def slice_attention(params: dict[str, Tensor], index: dict[str, Tensor]) -> dict[str, Tensor]:
    rows = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv"}
    out = {}
    for name, t in params.items():
        proj = name.split(".")[0]
        if proj in rows:
            out[name] = t.index_select(0, index[rows[proj]].to(t.device))
        elif name == "o_proj.weight":
            out[name] = t.index_select(1, index["q"].to(t.device))
        else:
            out[name] = t
    return out


def slice_mlp(params: dict[str, Tensor], kept: int) -> dict[str, Tensor]:
    return {
        "gate_proj.weight": params["gate_proj.weight"][:kept],
        "up_proj.weight": params["up_proj.weight"][:kept],
        "down_proj.weight": params["down_proj.weight"][:, :kept],
    }
