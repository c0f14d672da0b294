"""Graph code for one block: pre-norm, mixer (Mamba2 or attention), optional gated MLP.

Every function takes the builder, the layer's weights (numpy, checkpoint names without
the ``layers.{i}.`` prefix) and value names, and returns value names. ``rank`` is 2 for
the step graph ([b, d] hidden states) and 3 for prefill ([b, t, d]).
"""

from __future__ import annotations

import numpy as np

from edgeseq.config import ModelConfig
from edgeseq.export.builder import GraphBuilder, linear, rmsnorm, silu, split
from edgeseq.export.flavors import MixerWeights, SSMDims


def lead(rank: int) -> tuple[int, ...]:
    """Reshape dims that copy the leading (batch, time) axes."""
    return (0,) * (rank - 1)


def mat(g: GraphBuilder, w: dict[str, np.ndarray], prefix: str, name: str) -> str:
    """A projection weight, stored transposed ([in, out]) for MatMul under ``<name>.t``."""
    return g.weight(f"{prefix}{name}.weight.t", np.ascontiguousarray(w[f"{name}.weight"].T))


def bias(g: GraphBuilder, w: dict[str, np.ndarray], prefix: str, name: str) -> str | None:
    key = f"{name}.bias"
    return g.weight(f"{prefix}{key}", w[key]) if key in w else None


def vec(g: GraphBuilder, w: dict[str, np.ndarray], prefix: str, name: str) -> str:
    return g.weight(f"{prefix}{name}", w[name])


def gated_norm(g: GraphBuilder, y: str, z: str, weight: str, groups: int, width: int, eps: float, rank: int) -> str:
    """RMSNorm(y * silu(z)) over ``groups`` groups of the last axis, times weight."""
    yz = g.op("Mul", y, silu(g, z))
    grouped = g.op("Reshape", yz, g.ints(*lead(rank), groups, width // groups))
    ms = g.op("ReduceMean", g.op("Mul", grouped, grouped), g.ints(-1), keepdims=1)
    normed = g.op("Div", grouped, g.op("Sqrt", g.op("Add", ms, g.const(eps))))
    return g.op("Mul", g.op("Reshape", normed, g.ints(*lead(rank), width)), weight)


def mamba2(g, flavor, config: ModelConfig, i: int, w, x: str, past: dict[str, str], rank: int):
    """x [b,(t,)d] normed -> out [b,(t,)d], {"conv": present, "ssm": present}.

        x -> in_proj -> z | xBC | dt
                        xBC, dt -> conv + SSM core (flavor) -> y
        y, z -> gated RMSNorm -> out_proj
    """
    m, p = config.mamba, f"layers.{i}.mixer."
    H, P, N, G = config.layer_heads(i), m.headdim, m.d_state, m.ngroups
    di, gn = H * P, G * N
    zxbcdt = linear(g, x, mat(g, w, p, "in_proj"), bias(g, w, p, "in_proj"))
    z, xBC, dt = split(g, zxbcdt, [di, di + 2 * gn, H])
    weights = MixerWeights(
        conv_weight=w["conv1d.weight"][:, 0, :],
        conv_bias=w.get("conv1d.bias"),
        dt_bias=vec(g, w, p, "dt_bias"),
        A=-np.exp(w["A_log"].astype(np.float64)).astype(np.float32),
        D=w["D"],
        dt_limit=m.dt_limit,
    )
    y, present = flavor.mixer_core(g, SSMDims(H, G, P, N, m.chunk_size), weights, xBC, dt, past, rank)
    y = gated_norm(g, g.op("Reshape", y, g.ints(*lead(rank), di)), z, vec(g, w, p, "norm.weight"), G, di,
                   config.norm_eps, rank)
    out = linear(g, y, mat(g, w, p, "out_proj"), bias(g, w, p, "out_proj"))
    return out, present


def gated_mlp(g: GraphBuilder, w, i: int, x: str) -> str:
    """down(silu(gate(x)) * up(x)); w holds the MLP's weights under their short names."""
    p = f"layers.{i}.mlp."
    hidden = g.op("Mul", silu(g, linear(g, x, mat(g, w, p, "gate_proj"))), linear(g, x, mat(g, w, p, "up_proj")))
    return linear(g, hidden, mat(g, w, p, "down_proj"))


def block(g, flavor, config: ModelConfig, i: int, weights: dict[str, np.ndarray], h: str, past, position, rank):
    """h + mixer(norm(h)) (+ mlp(mlp_norm(.))) -> h, present state of layer i."""
    from edgeseq.export.attention import attention  # attention graph code lives beside this

    prefix = f"layers.{i}."
    w = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    mixer_w = {k[len("mixer.") :]: v for k, v in w.items() if k.startswith("mixer.")}
    x = rmsnorm(g, h, g.weight(f"{prefix}norm.weight", w["norm.weight"]), config.norm_eps)
    if config.layers[i].mixer == "mamba2":
        y, present = mamba2(g, flavor, config, i, mixer_w, x, past, rank)
    else:
        y, present = attention(g, config, i, mixer_w, x, past, position, rank)
    h = g.op("Add", h, y)
    if config.layers[i].mlp:
        x = rmsnorm(g, h, g.weight(f"{prefix}mlp_norm.weight", w["mlp_norm.weight"]), config.norm_eps)
        mlp_w = {k[len("mlp.") :]: v for k, v in w.items() if k.startswith("mlp.")}
        h = g.op("Add", h, gated_mlp(g, mlp_w, i, x))
    return h, present
