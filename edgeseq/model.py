"""The nested language model: embedding -> blocks -> final norm -> head.

Each block is pre-norm residual: h += mixer(norm(h)), then, if the layer has one,
h += mlp(mlp_norm(h)). A mixer is Mamba2 (SSD) or attention over a ring-buffer cache.
The model runs at any width spec directly: weights are sliced on the fly through
``edgeseq.nesting``, the same maps ``extract`` uses to materialise a smaller model.

Weight names (``embedding.weight``, ``layers.{i}.mixer.in_proj.weight``, ...) are the
native checkpoint keys; checkpoint families rename into them.

Departures from upstream Mamba2 (mamba_ssm, HF): none in the math. The residual stream is
kept in the parameters' dtype (no separate fp32 residual); the scan, norms and state run
in fp32 (fp64 for an fp64 model).

``NestedLM.use_kernels()`` routes the Mamba2 scan and step through the custom ops
``torch.ops.edgeseq.ssd_scan`` / ``ssd_step`` (Triton on CUDA, the ``_ref`` twins
elsewhere); a bf16/fp16 model then feeds the scan X, B and C in its own dtype, with the
state still fp32. Off by default: validation compares against the pure reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeseq.config import ModelConfig
from edgeseq.errors import ConfigError
from edgeseq.nesting import attention_index, mamba2_index, slice_attention, slice_mamba2, slice_mlp
from edgeseq.reference import (
    attention_prefill_ref,
    attention_step_ref,
    causal_conv1d_ref,
    causal_conv1d_step_ref,
    gated_mlp_ref,
    gated_rmsnorm_ref,
    rmsnorm_ref,
    rope_ref,
    ssd_scan_ref,
    ssd_step_ref,
)
from edgeseq.state import AttentionLayerState, Mamba2LayerState, ModelState
from edgeseq.width import LayerWidth, WidthSpec, resolve


def _state_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rmsnorm_ref(x, self.weight, self.eps)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        m = config.mamba
        self.n_heads, self.ngroups, self.headdim, self.d_state = config.layer_heads(i), m.ngroups, m.headdim, m.d_state
        self.chunk_size, self.dt_limit, self.eps = m.chunk_size, m.dt_limit, config.norm_eps
        d_inner, bc = self.n_heads * m.headdim, 2 * m.ngroups * m.d_state
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner + bc + self.n_heads, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(d_inner + bc, d_inner + bc, m.d_conv, groups=d_inner + bc, bias=m.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = RMSNorm(d_inner, config.norm_eps)
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=m.proj_bias)
        self.kernels = False  # NestedLM.use_kernels: the custom ops instead of the reference calls
        self._init_ssm(m.dt_min, m.dt_max)

    def _init_ssm(self, dt_min: float, dt_max: float) -> None:
        # dt log-uniform in [dt_min, dt_max]; dt_bias is its softplus inverse (mamba_ssm's init)
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))

    def params_at(self, kept: int) -> dict[str, Tensor]:
        params = dict(self.named_parameters())
        if kept == self.n_heads:
            return params
        return slice_mamba2(params, mamba2_index(self.n_heads, self.ngroups, self.headdim, self.d_state, kept))

    def _project(self, p: dict[str, Tensor], u: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
        zxbcdt = F.linear(u, p["in_proj.weight"], p.get("in_proj.bias"))
        d_inner = heads * self.headdim
        return zxbcdt.split([d_inner, zxbcdt.size(-1) - d_inner - heads, heads], dim=-1)  # z, xBC, dt

    def _ssm_inputs(self, p: dict[str, Tensor], xBC: Tensor, dt: Tensor, heads: int):
        d_inner, gn = heads * self.headdim, self.ngroups * self.d_state
        x, B, C = xBC.split([d_inner, gn, gn], dim=-1)
        dt = F.softplus(dt + p["dt_bias"].to(dt.dtype)).clamp(*self.dt_limit)
        A = -torch.exp(p["A_log"].to(dt.dtype))
        return x, B, C, dt, A

    def _output(self, p: dict[str, Tensor], y: Tensor, z: Tensor, out_dtype: torch.dtype) -> Tensor:
        y = gated_rmsnorm_ref(y, z, p["norm.weight"], self.eps, group_size=y.size(-1) // self.ngroups)
        return F.linear(y.to(out_dtype), p["out_proj.weight"], p.get("out_proj.bias"))

    def forward(self, u: Tensor, state: Mamba2LayerState, kept: int) -> tuple[Tensor, Mamba2LayerState]:
        """u (b, l, d) -> (b, l, d); a whole prompt through the chunked scan."""
        p, (b, l, _) = self.params_at(kept), u.shape
        z, xBC, dt = self._project(p, u, kept)
        sd = state.ssm.dtype
        xBC, conv = causal_conv1d_ref(xBC.to(sd), p["conv1d.weight"][:, 0], p.get("conv1d.bias"), state.conv)
        x, B, C, dt, A = self._ssm_inputs(p, xBC, dt.to(sd), kept)
        io = u.dtype if self.kernels and u.dtype in (torch.bfloat16, torch.float16) else sd  # the scan's X, B, C
        scan = torch.ops.edgeseq.ssd_scan if self.kernels else ssd_scan_ref
        y, ssm = scan(
            x.reshape(b, l, kept, self.headdim).to(io),  # (b, l, h, p)
            dt,
            A,
            B.reshape(b, l, self.ngroups, self.d_state).to(io),  # (b, l, g, n)
            C.reshape(b, l, self.ngroups, self.d_state).to(io),
            self.chunk_size,
            D=p["D"].to(sd),
            initial_state=state.ssm,
        )
        return self._output(p, y.reshape(b, l, -1), z, u.dtype), Mamba2LayerState(conv, ssm)

    def step(self, u: Tensor, state: Mamba2LayerState, kept: int) -> tuple[Tensor, Mamba2LayerState]:
        """u (b, d) -> (b, d); one token through the recurrence."""
        p, b = self.params_at(kept), u.size(0)
        z, xBC, dt = self._project(p, u, kept)
        if self.kernels:  # conv, dt, state update and output in one launch on CUDA
            y, conv, ssm = torch.ops.edgeseq.ssd_step(
                xBC, dt, state.conv, p["conv1d.weight"][:, 0], p.get("conv1d.bias"), p["dt_bias"],
                -torch.exp(p["A_log"].to(state.ssm.dtype)), p["D"], state.ssm, self.ngroups, *self.dt_limit,
            )  # fmt: skip
            return self._output(p, y.reshape(b, -1), z, u.dtype), Mamba2LayerState(conv, ssm)
        sd = state.ssm.dtype
        xBC, conv = causal_conv1d_step_ref(xBC.to(sd), state.conv, p["conv1d.weight"][:, 0], p.get("conv1d.bias"))
        x, B, C, dt, A = self._ssm_inputs(p, xBC, dt.to(sd), kept)
        y, ssm = ssd_step_ref(
            state.ssm,
            x.reshape(b, kept, self.headdim),  # (b, h, p)
            dt,
            A,
            B.reshape(b, self.ngroups, self.d_state),  # (b, g, n)
            C.reshape(b, self.ngroups, self.d_state),
            D=p["D"],
        )
        return self._output(p, y.reshape(b, -1), z, u.dtype), Mamba2LayerState(conv, ssm)


class AttentionMixer(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        a = config.attention
        self.n_heads, self.q_per_kv, self.head_dim = config.layer_heads(i), a.q_per_kv, a.head_dim
        self.window, self.theta = config.layers[i].window, a.rope_theta
        self.rot_dim = round(a.head_dim * a.rope_fraction)
        kv = self.n_heads // a.q_per_kv
        self.q_proj = nn.Linear(config.d_model, self.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * a.head_dim, config.d_model, bias=a.out_bias)

    def params_at(self, kept: int) -> dict[str, Tensor]:
        params = dict(self.named_parameters())
        if kept == self.n_heads:
            return params
        return slice_attention(params, attention_index(self.n_heads, self.q_per_kv, self.head_dim, kept))

    def _qkv(self, p: dict[str, Tensor], u: Tensor, positions: Tensor):
        """u (b, l, d); positions (b, l) -> rotated q (b, l, h, d), k (b, l, k, d), v."""
        q, k, v = (
            F.linear(u, p[f"{n}.weight"], p.get(f"{n}.bias")).unflatten(-1, (-1, self.head_dim))
            for n in ("q_proj", "k_proj", "v_proj")
        )
        return rope_ref(q, positions, self.theta, self.rot_dim), rope_ref(k, positions, self.theta, self.rot_dim), v

    def forward(self, u: Tensor, state: AttentionLayerState, position: Tensor, kept: int):
        p, l = self.params_at(kept), u.size(1)
        q, k, v = self._qkv(p, u, position[:, None] + torch.arange(l, device=u.device))
        sd = state.key.dtype
        o, key, value = attention_prefill_ref(
            q.to(sd), k.to(sd), v.to(sd), state.key, state.value, position, self.window
        )
        out = F.linear(o.flatten(-2).to(u.dtype), p["o_proj.weight"], p.get("o_proj.bias"))
        return out, AttentionLayerState(key, value)

    def step(self, u: Tensor, state: AttentionLayerState, position: Tensor, kept: int):
        p = self.params_at(kept)
        q, k, v = (t[:, 0] for t in self._qkv(p, u[:, None], position[:, None]))
        sd = state.key.dtype
        o, key, value = attention_step_ref(q.to(sd), k.to(sd), v.to(sd), state.key, state.value, position, self.window)
        out = F.linear(o.flatten(-2).to(u.dtype), p["o_proj.weight"], p.get("o_proj.bias"))
        return out, AttentionLayerState(key, value)


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.d_mlp = d_mlp
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)

    def params_at(self, kept: int) -> dict[str, Tensor]:
        params = dict(self.named_parameters())
        return params if kept == self.d_mlp else slice_mlp(params, kept)

    def forward(self, x: Tensor, kept: int) -> Tensor:
        p = self.params_at(kept)
        return gated_mlp_ref(x, p["gate_proj.weight"], p["up_proj.weight"], p["down_proj.weight"])


class Block(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        spec = config.layers[i]
        self.is_mamba = spec.mixer == "mamba2"
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Mamba2Mixer(config, i) if self.is_mamba else AttentionMixer(config, i)
        if spec.mlp:
            self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
            self.mlp = GatedMLP(config.d_model, config.layer_d_mlp(i))
        else:
            self.mlp = None

    def forward(self, h: Tensor, state, position: Tensor, width: LayerWidth, step: bool):
        x = self.norm(h)
        run = self.mixer.step if step else self.mixer.forward
        y, state = run(x, state, width.heads) if self.is_mamba else run(x, state, position, width.heads)
        h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h), width.d_mlp)
        return h, state

    def sliced_state_dict(self, width: LayerWidth) -> dict[str, Tensor]:
        """This block's parameters at ``width``, under their checkpoint names."""
        out = {"norm.weight": self.norm.weight}
        out |= {f"mixer.{k}": v for k, v in self.mixer.params_at(width.heads).items()}
        if self.mlp is not None:
            out["mlp_norm.weight"] = self.mlp_norm.weight
            out |= {f"mlp.{k}": v for k, v in self.mlp.params_at(width.d_mlp).items()}
        return out


class NestedLM(nn.Module):
    """forward(ids, state=None, width=None) -> (logits, state); step(ids, state) likewise."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self._widths: dict[str, tuple[LayerWidth, ...]] = {}

    def use_kernels(self, enabled: bool = True) -> NestedLM:
        """Run the Mamba2 layers through edgeseq's custom ops (Triton kernels on CUDA tensors,
        their pure-torch twins elsewhere) instead of the reference functions. Returns self."""
        if enabled:
            import edgeseq.kernels  # noqa: F401  (registers torch.ops.edgeseq.*)
        for layer in self.layers:
            if isinstance(layer.mixer, Mamba2Mixer):
                layer.mixer.kernels = enabled
        return self

    def widths(self, width: WidthSpec | float | str | tuple[LayerWidth, ...] | None) -> tuple[LayerWidth, ...]:
        """Per-layer sizes for a width spec (cached)."""
        if isinstance(width, tuple) and width and isinstance(width[0], LayerWidth):
            return width
        key = str(width)
        if key not in self._widths:
            self._widths[key] = resolve(self.config, width)
        return self._widths[key]

    def init_state(self, batch: int, width=None, dtype: torch.dtype | None = None) -> ModelState:
        dtype = dtype or _state_dtype(self.embedding.weight)
        return ModelState.zeros(self.config, batch, self.widths(width), dtype, self.embedding.weight.device)

    def _head(self, h: Tensor) -> Tensor:
        h = self.norm_f(h)
        weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def _check_context(self, state: ModelState, new_tokens: int) -> None:
        limit = self.config.attention.max_context if self.config.attention else None
        has_global = any(s.mixer == "attention" and s.window is None for s in self.config.layers)
        if has_global and int(state.position.max()) + new_tokens > limit:
            raise ConfigError(
                f"stream exceeds the global attention cache of {limit} tokens; raise attention.max_context or reset"
            )

    def forward(self, ids: Tensor, state: ModelState | None = None, width=None, last_only: bool = False):
        """ids (b, l) int -> logits (b, l, vocab) (or (b, vocab) with last_only), new state."""
        widths = self.widths(width)
        state = state if state is not None else self.init_state(ids.size(0), widths)
        self._check_context(state, ids.size(1))
        h = self.embedding(ids)
        layers = []
        for block, layer_state, w in zip(self.layers, state.layers, widths):
            h, layer_state = block(h, layer_state, state.position, w, step=False)
            layers.append(layer_state)
        if last_only:
            h = h[:, -1]
        return self._head(h), ModelState(layers, state.position + ids.size(1))

    def step(self, ids: Tensor, state: ModelState, width=None, check_context: bool = True) -> tuple[Tensor, ModelState]:
        """ids (b,) or (b, 1) int -> logits (b, vocab), new state. ``check_context=False`` skips
        the global-attention cache check (it reads the position on the host: a CUDA graph
        capture cannot), for callers that count tokens themselves."""
        widths = self.widths(width)
        if check_context:
            self._check_context(state, 1)
        h = self.embedding(ids.reshape(-1))
        layers = []
        for block, layer_state, w in zip(self.layers, state.layers, widths):
            h, layer_state = block(h, layer_state, state.position, w, step=True)
            layers.append(layer_state)
        return self._head(h), ModelState(layers, state.position + 1)

    def sliced_state_dict(self, width=None) -> dict[str, Tensor]:
        out = {"embedding.weight": self.embedding.weight, "norm_f.weight": self.norm_f.weight}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head.weight
        for i, (block, w) in enumerate(zip(self.layers, self.widths(width))):
            out |= {f"layers.{i}.{k}": v for k, v in block.sliced_state_dict(w).items()}
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
