"""What each nested width and precision costs on a target, and the choice ``edgeseq
export`` makes when no width is given. Bytes come from the one sizing model
(``edgeseq.sizing.footprint``, which ``inspect`` shows too). A bundle carries a step
and a prefill graph, and a streaming session holds both, so weights count twice in the
bundle and in memory.

Peak memory (``peak_memory``) is what a Python process streaming the bundle with
onnxruntime holds at its peak, the number ``edgeseq bench`` measures as peak RSS:

    runtime   Python, numpy, onnxruntime and edgeseq's session modules, imported
    sessions  per graph (step, prefill): the session's own memory and its weights as
              onnxruntime holds them (more than the file stores; fp16 at fp32 size on CPUs)
    prefill   the working memory of one PREFILL_TOKENS-token prompt in the prefill graph:
              the widest layer's intermediates, or for fp32 graphs the split-K partial
              products where they are larger
    states    each stream's state, in and out

The constants below were measured on x86-64 Linux (CPython 3.11, numpy 2, onnxruntime
1.32, 2 threads) with scripts/plan_vs_bench.py, peak RSS read from /proc's VmHWM; over
the shipped models at widths 1 to 1/4 and every precision the prediction is within 10 %
of the measurement (scripts/results/plan_vs_bench.json). Another Python, allocator or
runtime version moves the runtime and session parts; a C++ app has no Python part. Not
modelled: attention over a long global cache, whose prefill scores grow as heads x tokens
x cache (a model with 'A' layers of 4096 positions peaked at 2.2x the estimate).

Decode is memory bound at batch 1: every weight byte (one embedding row) and the state
are read once per token, the state written once. The predicted latency is that traffic
over ``bandwidth x efficiency`` (the target's measured or estimated fraction of peak),
or the compute time at the same efficiency where that is longer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeseq.choices import PRECISIONS
from edgeseq.config import ModelConfig
from edgeseq.errors import EdgeseqError
from edgeseq.sizing import Footprint, footprint, state_bytes
from edgeseq.width import WidthSpec, resolve

MiB = 2**20
PREFILL_TOKENS = 512  # the prompt chunk the working-memory estimate allows for (edgeseq bench's default prompt)
# Measured RSS after each import, in a fresh process: python 10.9, + numpy 14.9, + onnxruntime
# 20.1, + edgeseq.runtimes.session and edgeseq.deploy 6.2 MiB.
RUNTIME_RSS = 52 * MiB
# A session's own memory beyond its weights (thread pool, kernels, graph): 12.9 MiB for the
# first session of a process, 3.7 for the second (graphs of 2 MiB of weights); 8 each.
SESSION_RSS = 8 * MiB
# Resident bytes per stored weight byte: onnxruntime copies the initializers out of the parsed
# model, whose freed buffers the allocator partly keeps, and int8/int4 kernels prepack their
# weights. Measured 1.2-1.4 over the shipped models at every precision.
RESIDENT_PER_STORED = 1.3
# Prefill working memory per prompt token and per projection output of the widest layer (the
# scan's, attention's and MLP's intermediates scale with it, hardly the depth: 2 and 6 layers
# alike, 12 layers 1.5x): measured 45-58 B at 512 tokens over the shipped models.
PREFILL_BYTES_PER_COLUMN = 56
# export.graphs.SPLIT_K: fp32 graphs sum each dot product over ``in`` in blocks of this many,
# through [tokens, in / SPLIT_K, out] partial products that the prefill holds twice (MatMul
# output, then Squeeze's); larger than the rest only for wide models (d_model 768: 152 MiB).
SPLIT_K = 64


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
    peak_bytes: int  # peak_memory(...).total: runtime, both sessions, a prefill, the states
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


def plan(
    config: ModelConfig,
    target,
    streams: int = 1,
    min_tokens_per_s: float | None = None,
    memory_bytes: int | None = None,
    widths: list[str] | None = None,
) -> list[PlanRow]:
    """Every candidate width (or the ``widths`` given) x every precision the target runs."""
    budget = target.memory_bytes if memory_bytes is None else memory_bytes
    specs = [(w, "given") for w in widths] if widths else candidate_widths(config)
    rows = []
    for spec, kind in specs:
        layer_widths = resolve(config, WidthSpec.parse(spec))
        fp = footprint(config, layer_widths)
        state = state_bytes(config, layer_widths)
        for precision in (p for p in PRECISIONS if p in target.precisions):
            rows.append(_row(spec, kind, precision, fp, state, target, streams, budget, min_tokens_per_s))
    return rows


@dataclass(frozen=True)
class PeakMemory:
    """A streaming process's peak resident memory, by part (bytes; the module docstring
    says what each holds and how the constants were measured)."""

    runtime: int
    sessions: int  # step + prefill: their own memory and their weights as held
    prefill: int
    states: int

    @property
    def total(self) -> int:
        return self.runtime + self.sessions + self.prefill + self.states


def peak_memory(fp: Footprint, precision: str, state: int, target, streams: int = 1,
                tokens: int = PREFILL_TOKENS) -> PeakMemory:  # fmt: skip
    """What a process streaming ``streams`` streams of this model holds at its peak, a
    ``tokens``-token prompt through the prefill graph included."""
    held = fp.weight_bytes(_held_precision(precision, target))
    sessions = 2 * (SESSION_RSS + round(RESIDENT_PER_STORED * held))
    widest_layer = PREFILL_BYTES_PER_COLUMN * fp.layer_columns
    split_k = 2 * 4 * max((math.ceil(k / SPLIT_K) * n for layer in fp.layer_matrices for k, n in layer), default=0)
    prefill = tokens * max(widest_layer, split_k if precision == "fp32" else 0)
    return PeakMemory(RUNTIME_RSS, sessions, prefill, 2 * streams * state)


def _held_precision(precision: str, target) -> str:
    """The precision weights are held at: on a CPU, onnxruntime folds the Cast that follows
    each fp16 weight into an fp32 constant when it builds the session (measured: fp16
    bundles peak within 3 % of fp32's); a CUDA device keeps fp16."""
    return "fp32" if precision == "fp16" and target.compute_capability is None else precision


def _row(spec, kind, precision, fp: Footprint, state: int, target, streams, budget, min_tps) -> PlanRow:
    weights = fp.weight_bytes(precision)
    peak = peak_memory(fp, precision, state, target, streams).total
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
        raise NoFitError(
            f"width {width} at {precision} needs {_mib(row.peak_bytes)} but {target.name} leaves "
            f"{_mib(budget)} for the model; pick a narrower width or a smaller precision "
            f"(`edgeseq plan --target {target.name}` lists what fits)"
        )
    return row


def _why_nothing_fits(rows: list[PlanRow], budget: int, min_tps: float | None) -> str:
    smallest = min(rows, key=lambda r: r.peak_bytes)
    if not smallest.fits:
        return (
            f"the narrowest configuration (width {smallest.width} at {smallest.precision}) needs "
            f"{_mib(smallest.peak_bytes)} but the budget is {_mib(budget)}; raise --memory-budget, pick a larger "
            f"target or a smaller model"
        )
    fastest = max((r for r in rows if r.fits), key=lambda r: r.tokens_per_s)
    return (
        f"no configuration that fits reaches {min_tps:g} tokens/s (the fastest, width {fastest.width} at "
        f"{fastest.precision}, is predicted at {fastest.tokens_per_s:,.0f}); lower --min-tokens-per-s"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
