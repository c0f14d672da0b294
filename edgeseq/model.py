"""The nested language model: embedding -> blocks -> final norm -> head.

Each block is pre-norm residual: h += sum of its mixers(norm(h)) (one mixer for every
model so far, parallel ones for Falcon-H1-style blocks), then, if the layer has one,
h += mlp(mlp_norm(h)). What a mixer or MLP computes is its layer kind's module
(``edgeseq.kinds``): Mamba2 (SSD), attention over a ring-buffer cache, gated MLP. The
model runs at any width spec directly: each part's weights are sliced on the fly through
its kind's ``weight_index``, the same maps ``extract`` uses to materialise a smaller model.

Weight names (``embedding.weight``, ``layers.{i}.mixer.in_proj.weight``, ...) are the
native checkpoint keys; checkpoint families rename into them.

Departures from upstream Mamba2 (mamba_ssm, HF): none in the math. The residual stream is
kept in the parameters' dtype (no separate fp32 residual); the scan, norms and state run
in fp32 (fp64 for an fp64 model).

``NestedLM.use_kernels()`` routes the parts that have kernels (Mamba2's scan and step)
through the custom ops ``torch.ops.edgeseq.*`` (Triton on CUDA, the ``_ref`` twins
elsewhere). Off by default: validation compares against the pure reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeseq.config import ModelConfig
from edgeseq.errors import ConfigError
from edgeseq.kinds import get_kind
from edgeseq.reference import rmsnorm_ref
from edgeseq.state import ModelState
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


def slice_params(params: dict[str, Tensor], index) -> dict[str, Tensor]:
    """Parameters restricted to the entries a kind's ``weight_index`` keeps."""
    out = {}
    for name, t in params.items():
        if name in index:
            axis, idx = index[name]
            out[name] = t.index_select(axis, torch.as_tensor(idx, device=t.device))
        else:
            out[name] = t
    return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        spec = config.layers[i]
        self.config, self.i, self.spec = config, i, spec
        self.stored = {part: config.part_size(i, part) for part in spec.parts}
        self.state_names = {
            part: tuple(get_kind(part).state_shapes(config, i, size)) for part, size in self.stored.items()
        }
        if spec.mixers:
            self.norm = RMSNorm(config.d_model, config.norm_eps)
        modules = {part: get_kind(part).module(config, i, self.stored[part]) for part in spec.mixers}
        if len(spec.mixers) == 1:
            self.mixer = modules[spec.mixers[0]]
        elif spec.mixers:
            self.mixers = nn.ModuleDict(modules)
        if spec.mlp:
            self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
            self.mlp = get_kind(spec.mlp).module(config, i, self.stored[spec.mlp])
        else:
            self.mlp = None

    def part(self, kind: str) -> nn.Module:
        return self.get_submodule(self.spec.prefix(kind))

    def params_at(self, kind: str, kept: int) -> dict[str, Tensor]:
        """The part's parameters at ``kept`` (its size as stored: the parameters themselves)."""
        params = dict(self.part(kind).named_parameters())
        if kept == self.stored[kind]:
            return params
        return slice_params(params, get_kind(kind).weight_index(self.config, self.i, self.stored[kind], kept))

    def _run(self, kind: str, x: Tensor, state: dict, position: Tensor, width: LayerWidth, step: bool,
             mask: Tensor | None):  # fmt: skip
        module, kept = self.part(kind), width[kind]
        own = {k: state[k] for k in self.state_names[kind]}
        if step:
            return module.step(self.params_at(kind, kept), x, own, position, kept)
        return module(self.params_at(kind, kept), x, own, position, kept, mask)

    def forward(self, h: Tensor, state: dict, position: Tensor, width: LayerWidth, step: bool,
                mask: Tensor | None = None):  # fmt: skip
        new_state = {}
        if self.spec.mixers:
            x = self.norm(h)
            for kind in self.spec.mixers:
                y, part_state = self._run(kind, x, state, position, width, step, mask)
                h = h + y
                new_state |= part_state
        if self.mlp is not None:
            y, _ = self._run(self.spec.mlp, self.mlp_norm(h), state, position, width, step, mask)
            h = h + y
        return h, new_state

    def sliced_state_dict(self, width: LayerWidth) -> dict[str, Tensor]:
        """This block's parameters at ``width``, under their checkpoint names."""
        out = {"norm.weight": self.norm.weight} if self.spec.mixers else {}
        for kind in self.spec.mixers:
            out |= {f"{self.spec.prefix(kind)}.{k}": v for k, v in self.params_at(kind, width[kind]).items()}
        if self.mlp is not None:
            out["mlp_norm.weight"] = self.mlp_norm.weight
            out |= {f"mlp.{k}": v for k, v in self.params_at(self.spec.mlp, width[self.spec.mlp]).items()}
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
        """Run the parts that have kernels (Mamba2) through edgeseq's custom ops (Triton
        kernels on CUDA tensors, their pure-torch twins elsewhere) instead of the reference
        functions. Returns self."""
        if enabled:
            import edgeseq.kernels  # noqa: F401  (registers torch.ops.edgeseq.*)
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = enabled
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

    def _embed(self, ids: Tensor) -> Tensor:
        h = self.embedding(ids)
        scale = self.config.embedding_scale
        return h if scale == 1.0 else h * scale

    def _head(self, h: Tensor) -> Tensor:
        h = self.norm_f(h)
        weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def _check_context(self, state: ModelState, new_tokens: int | Tensor) -> None:
        limit = self.config.stream_limit()
        if limit is not None and int((state.position + new_tokens).max()) > limit:
            raise ConfigError(
                f"stream exceeds the global attention cache of {limit} tokens; raise attention.max_context or reset"
            )

    def forward(self, ids: Tensor, state: ModelState | None = None, width=None, last_only: bool = False,
                mask: Tensor | None = None):  # fmt: skip
        """ids (b, l) int -> logits (b, l, vocab) (or (b, vocab) with last_only), new state.

        mask (b, l) int or None (all ones): 1 = a token of that stream, 0 = a left pad (pads
        only before a row's tokens). A pad leaves every state as it was and is not counted
        in ``position``; the logits at pad positions are meaningless, the last ones are
        those after the row's last token (of an all-pad row, meaningless too)."""
        widths = self.widths(width)
        state = state if state is not None else self.init_state(ids.size(0), widths)
        tokens = ids.size(1) if mask is None else mask.sum(1)
        self._check_context(state, tokens)
        h = self._embed(ids)
        layers = []
        for block, layer_state, w in zip(self.layers, state.layers, widths):
            h, layer_state = block(h, layer_state, state.position, w, step=False, mask=mask)
            layers.append(layer_state)
        if last_only:
            h = h[:, -1]
        return self._head(h), ModelState(layers, state.position + tokens)

    def step(self, ids: Tensor, state: ModelState, width=None, check_context: bool = True) -> tuple[Tensor, ModelState]:
        """ids (b,) or (b, 1) int -> logits (b, vocab), new state. ``check_context=False`` skips
        the global-attention cache check (it reads the position on the host: a CUDA graph
        capture cannot), for callers that count tokens themselves."""
        widths = self.widths(width)
        if check_context:
            self._check_context(state, 1)
        h = self._embed(ids.reshape(-1))
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
