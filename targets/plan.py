"""What each nested width and precision costs on a target, and the choice ``edgeseq
export`` makes when no width is given. Bytes come from the one sizing model
(``edgeseq.sizing.footprint``, which ``inspect`` shows too). A bundle carries a step
and a prefill graph, and a streaming session holds both, so weights count twice in the
bundle and in memory.

Decode is memory bound at batch 1: every weight byte (one embedding row) and the state
are read once per token, the state written once. The predicted latency is that traffic
over ``bandwidth x efficiency`` (the target's measured or estimated fraction of peak),
or the compute time at the same efficiency where that is longer.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeseq.choices import PRECISIONS
from edgeseq.config import ModelConfig
from edgeseq.errors import EdgeseqError
from edgeseq.sizing import Footprint, footprint, state_bytes
from edgeseq.width import WidthSpec, resolve

RUNTIME_OVERHEAD = 48 * 2**20  # allowance for onnxruntime (estimate; the app around it is not counted)
PREFILL_TOKENS = 512  # the prompt chunk the working-memory estimate allows for


class NoFitError(EdgeseqError):
    """No configuration of the model fits the target's memory (or speed floor)."""


@dataclass(frozen=True)
class PlanRow:
    """One configuration (width x precision) on one target."""

    width: str
    kind: str  # "nested" or "mix'n'match"
    precision: str
    params: int
    weight_bytes: int  # one graph's weights
    bundle_bytes: int  # step + prefill graphs
    state_bytes: int  # one stream's decode state
    peak_bytes: int  # resident weights + states + prefill activations + runtime
    decode_ms: float  # predicted per token, batch 1
    fits: bool
    fast_enough: bool

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return d | {"tokens_per_s": self.tokens_per_s}


def candidate_widths(config: ModelConfig) -> list[tuple[str, str]]:
    """(width spec, kind): every nested width, widest first, and between each adjacent
    pair a Mix'n'Match model with the first half of the layers at the wider width."""
    widths = sorted(set(config.nested_widths), reverse=True)
    n = len(config.layers)
    out = []
    for wide, narrow in zip(widths, widths[1:] + [None]):
        out.append((_fmt(wide), "nested"))
        if narrow is not None and n > 1:
            per_layer = [wide] * (n // 2) + [narrow] * (n - n // 2)
            out.append((",".join(_fmt(w) for w in per_layer), "mix'n'match"))
    return out


def _fmt(w: float) -> str:
    return f"{w:g}"


def plan(config: ModelConfig, target, streams: int = 1, min_tokens_per_s: float | None = None,
         memory_bytes: int | None = None, widths: list[str] | None = None) -> list[PlanRow]:
    """Every candidate width (or the ``widths`` given) x every precision the target runs."""
    budget = target.memory_bytes if memory_bytes is None else memory_bytes
    specs = [(w, "given") for w in widths] if widths else candidate_widths(config)
    rows = []
    for spec, kind in specs:
        layer_widths = resolve(config, WidthSpec.parse(spec))
        fp = footprint(config, layer_widths)
        state = state_bytes(config, layer_widths)
        for precision in (p for p in PRECISIONS if p in target.precisions):
            rows.append(_row(spec, kind, precision, fp, state, config, target, streams, budget, min_tokens_per_s))
    return rows


def _row(spec, kind, precision, fp: Footprint, state: int, config, target, streams, budget, min_tps) -> PlanRow:
    weights = fp.weight_bytes(precision)
    activations = PREFILL_TOKENS * (4 * config.d_model + fp.widest_output) * 4  # fp32, a few live tensors
    peak = 2 * weights + 2 * streams * state + activations + RUNTIME_OVERHEAD
    traffic = fp.bytes_read_per_token(precision) + 2 * streams * state
    memory_s = traffic / (target.bandwidth_gbs * 1e9 * target.efficiency)
    rate = target.int8_tops if precision in ("int8", "int4") else target.fp16_tflops / (2 if precision == "fp32" else 1)
    compute_s = streams * fp.flops_per_token / (rate * 1e12 * target.efficiency) if rate > 0 else 0.0
    decode_ms = 1000 * max(memory_s, compute_s)
    return PlanRow(
        width=spec, kind=kind, precision=precision, params=fp.params,
        weight_bytes=weights, bundle_bytes=2 * weights, state_bytes=state, peak_bytes=peak, decode_ms=decode_ms,
        fits=peak <= budget, fast_enough=min_tps is None or 1000.0 / decode_ms >= min_tps,
    )  # fmt: skip


@dataclass(frozen=True)
class Choice:
    row: PlanRow
    reasons: tuple[str, ...]


def choose(rows: list[PlanRow], target, budget: int | None = None, min_tokens_per_s: float | None = None) -> Choice:
    """The widest configuration that fits and is fast enough; at that width the target's
    default precision if it qualifies, else the most faithful one that does."""
    budget = target.memory_bytes if budget is None else budget
    ok = [r for r in rows if r.fits and r.fast_enough]
    if not ok:
        raise NoFitError(_why_nothing_fits(rows, budget, min_tokens_per_s))
    widest = max(r.params for r in ok)
    at_width = [r for r in ok if r.params == widest]
    default = [r for r in at_width if r.precision == target.default_precision]
    pick = default[0] if default else min(at_width, key=lambda r: PRECISIONS.index(r.precision))
    reasons = [
        (f"width {pick.width} is the widest configuration that fits {_mib(budget)} for the model on {target.name} "
         f"(peak {_mib(pick.peak_bytes)})"),
        f"{pick.precision}: " + ("the target's default precision" if default else
                                 f"the most faithful precision that qualifies (default {target.default_precision} does not)"),
        f"predicted decode {pick.tokens_per_s:,.0f} tokens/s at batch 1 "
        f"({target.bandwidth_gbs:g} GB/s x {target.efficiency:g} efficiency)"
        + (f", floor {min_tokens_per_s:g}" if min_tokens_per_s else ""),
    ]  # fmt: skip
    return Choice(pick, tuple(reasons))


def check_fits(rows: list[PlanRow], width: str, precision: str, target, budget: int | None = None) -> PlanRow:
    """The row for an explicit width and precision; refuses one that cannot fit."""
    budget = target.memory_bytes if budget is None else budget
    matching = [r for r in rows if r.precision == precision]
    if not matching:
        raise NoFitError(f"{target.name} does not run {precision}; use one of {', '.join(target.precisions)}")
    row = matching[0]
    if not row.fits:
        raise NoFitError(f"width {width} at {precision} needs {_mib(row.peak_bytes)} but {target.name} leaves "
                         f"{_mib(budget)} for the model; pick a narrower width or a smaller precision "
                         f"(`edgeseq plan --target {target.name}` lists what fits)")
    return row


def _why_nothing_fits(rows: list[PlanRow], budget: int, min_tps: float | None) -> str:
    smallest = min(rows, key=lambda r: r.peak_bytes)
    if not smallest.fits:
        return (f"the narrowest configuration (width {smallest.width} at {smallest.precision}) needs "
                f"{_mib(smallest.peak_bytes)} but the budget is {_mib(budget)}; raise --memory-budget, pick a larger "
                f"target or a smaller model")
    fastest = max((r for r in rows if r.fits), key=lambda r: r.tokens_per_s)
    return (f"no configuration that fits reaches {min_tps:g} tokens/s (the fastest, width {fastest.width} at "
            f"{fastest.precision}, is predicted at {fastest.tokens_per_s:,.0f}); lower --min-tokens-per-s")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
