"""Golden files: what the reference said about the validation's prompts and streams, in
one safetensors file, so that a candidate can be checked later, on a device without torch.

A golden file keeps what the checks need, not every call: per prompt or stream, the
tokens the candidate is fed, the reference's logits at the kept calls, and the outputs
of the last call (the present state, ``present.position``). The candidate feeds its own
state back from call to call, as in deployment, so no intermediate state is stored; a
starting state is stored only when it is not zero. The long stream keeps the logits of
at most ``KEPT_CALLS`` calls spread over it, ending at the last (its drift is judged
there), and beside them the fp64 oracle's logits, as fp64 minus the fp32 reference.
Logits and states keep their own dtype (float32): fp32 is judged to 1e-4 on logits and a
top-1 from fp16 logits could flip at a near tie.

Layout (``NNN`` numbers the records, in the order they were recorded):

    tensors   "NNN/tokens"        [B, T] int64: the whole prompt, or one token per call
              "NNN/kept"          [K] int64: after which tokens the logits were kept
              "NNN/logits"        [K, B, V] the reference's logits there
              "NNN/oracle_delta"  [K, B, V] float32, fp64 logits - fp32 logits (long stream)
              "NNN/final/{name}"  the reference's other outputs after the last token
              "NNN/start/{name}"  the starting state, when it is not zero
    metadata  "edgeseq.golden": JSON {format, io, prefill_io, info, records: [{phase,
              whole, final, start, oracle}]}

Sizes at validation's defaults (4 held-out prompts, 256 decode steps, a 4096-step long
stream), against x86-64-cpu bundles (two flavors): mamba2-tiny 8.3 MB at width 1 (fp32
bundle 94.6 MB, int8 25.8 MB), 2.8 MB at 1/4 (29.9, 9.2 MB); hybrid-tiny 12.2 MB at
width 1 (103.1, 27.8 MB), 3.7 MB at 1/4 (30.2, 9.1 MB). Format 1 stored every call's
state: 652 MB for a 13 MB bundle. This module and everything it imports must not import
torch (a test checks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from edgeseq.atomic import atomic_file
from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import GraphIO, Tolerance
from edgeseq.validate.compare import (
    DECODE_STEPS,
    LOGITS,
    LONG_STEPS,
    Runner,
    as_tokens,
    compare_handoff,
    describe_runner,
    infer_arrays,
    random_prompts,
    run_stream,
    takes_whole_prompt,
    token_feeds,
    token_input,
    vocab_size,
    zero_state,
)
from edgeseq.validate.results import CompareResult, Comparison, PhaseResult, resolve_tolerance

GOLDEN_FORMAT = 2  # 1 kept every call's inputs and outputs, states included
HEADER_KEY = "edgeseq.golden"
KEPT_CALLS = 256  # most calls of one stream whose logits are kept; decode's 256 steps all are
RECORD_AGAIN = "record it again with `edgeseq validate BUNDLE --save-golden FILE`"


class GoldenError(EdgeseqError):
    """A golden file is missing, damaged or of an unknown format."""


@dataclass
class GoldenRecord:
    """One prompt or stream of the reference: what the candidate is fed, what it must give.

    whole: the reference took ``tokens`` in one call (a prefill graph); else one call per
    token, its state fed back. Shapes: tokens [B, T] int64, kept [K] int64 (ascending, the
    last is T - 1), logits [K, B, V], oracle_delta like logits or None.
    """

    phase: str  # judged with results.PHASE_CHECKS[phase]
    tokens: np.ndarray
    whole: bool
    kept: np.ndarray
    logits: np.ndarray
    final: dict[str, np.ndarray]  # the other outputs after the last token
    start: dict[str, np.ndarray] | None = None  # None: the zero state
    oracle_delta: np.ndarray | None = None  # fp64 logits - fp32 logits at the kept calls

    def oracle_logits(self, k: int) -> np.ndarray:
        """The fp64 oracle's logits at the k-th kept call, as float64."""
        return self.logits[k].astype(np.float64) + self.oracle_delta[k].astype(np.float64)


@dataclass
class Golden:
    records: list[GoldenRecord]
    io: GraphIO  # the step graph's: token input, state pairs, zero state
    info: dict = field(default_factory=dict)  # reference runner, model, anything to audit
    prefill_io: GraphIO | None = None  # the prefill graph's, where the prompts went through one


# --- writing and reading --------------------------------------------------------------


def save_golden(path: str | Path, golden: Golden, *, overwrite: bool = False) -> Path:
    """Write a golden file atomically; see the module docstring for its layout."""
    tensors: dict[str, np.ndarray] = {}
    entries = []
    for i, rec in enumerate(golden.records):
        arrays = {"tokens": rec.tokens, "kept": rec.kept, "logits": rec.logits, "oracle_delta": rec.oracle_delta}
        arrays |= {f"final/{k}": v for k, v in rec.final.items()}
        arrays |= {f"start/{k}": v for k, v in (rec.start or {}).items()}
        tensors |= {f"{i:03d}/{k}": np.ascontiguousarray(v) for k, v in arrays.items() if v is not None}
        entries.append({"phase": rec.phase, "whole": rec.whole, "final": list(rec.final),
                        "start": rec.start is not None, "oracle": rec.oracle_delta is not None})  # fmt: skip
    header = {"format": GOLDEN_FORMAT, "io": golden.io.to_dict(), "info": dict(golden.info), "records": entries,
              "prefill_io": golden.prefill_io.to_dict() if golden.prefill_io is not None else None}  # fmt: skip
    path = Path(path)
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    return path


def load_golden(path: str | Path) -> Golden:
    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"{path} not found; {RECORD_AGAIN}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        header = json.loads(meta[HEADER_KEY])
        if header.get("format") != GOLDEN_FORMAT:
            raise GoldenError(f"{path} is a golden file of format {header.get('format')} and this edgeseq reads "
                              f"format {GOLDEN_FORMAT}; {RECORD_AGAIN}")  # fmt: skip
        tensors = load_file(str(path))
        prefill_io = GraphIO.from_dict(header["prefill_io"]) if header.get("prefill_io") else None
        return Golden([_record(tensors, f"{i:03d}", e) for i, e in enumerate(header["records"])],
                      GraphIO.from_dict(header["io"]), header["info"], prefill_io)  # fmt: skip
    except GoldenError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors raises its own types; any failure reads the same)
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise GoldenError(f"{path} is not a readable golden file ({reason}); {RECORD_AGAIN}") from None


def _record(tensors: Mapping[str, np.ndarray], key: str, entry: Mapping) -> GoldenRecord:
    start = {k[len(f"{key}/start/") :]: v for k, v in tensors.items() if k.startswith(f"{key}/start/")}
    return GoldenRecord(
        entry["phase"], tensors[f"{key}/tokens"], entry["whole"], tensors[f"{key}/kept"], tensors[f"{key}/logits"],
        {name: tensors[f"{key}/final/{name}"] for name in entry["final"]},
        start if entry["start"] else None, tensors[f"{key}/oracle_delta"] if entry["oracle"] else None,
    )  # fmt: skip


# --- recording ------------------------------------------------------------------------


def kept_calls(calls: int, most: int = KEPT_CALLS) -> np.ndarray:
    """At most ``most`` call indices out of ``calls``, evenly spaced and ending at the last."""
    stride = max(1, math.ceil(calls / most))
    return np.arange(calls - 1, -1, -stride, dtype=np.int64)[::-1].copy()


class _Tape:
    """What ``run_stream`` records, call by call (it only appends), reduced on the way to
    what a golden file keeps: every call's token, the logits of the kept calls, the first
    call's state and the last call's outputs. A whole stream's calls would not fit in memory."""

    def __init__(self, io: GraphIO, kept: np.ndarray):
        self.ids, self.past = token_input(io), [past for past, _ in io.state_pairs]
        self.kept = set(kept.tolist())
        self.tokens: list[np.ndarray] = []
        self.logits: list[np.ndarray] = []
        self.start: dict[str, np.ndarray] = {}
        self.last: dict[str, np.ndarray] = {}

    def append(self, call: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]) -> None:
        feeds, outputs = call
        if not self.tokens:
            self.start = {name: np.array(feeds[name]) for name in self.past}
        if len(self.tokens) in self.kept:
            self.logits.append(np.array(outputs[LOGITS]))
        self.tokens.append(np.array(feeds[self.ids]))
        self.last = dict(outputs)


class _OracleTape:
    """The fp64 oracle, keeping its logits at the kept calls as ``run_stream`` drives it."""

    def __init__(self, oracle: Runner, kept: np.ndarray):
        self.oracle, self.kept, self.calls = oracle, set(kept.tolist()), 0
        self.io = getattr(oracle, "io", None)  # run_stream gives it its state in these dtypes
        self.logits: list[np.ndarray] = []

    def infer(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        out = self.oracle.infer(dict(feeds))
        if self.calls in self.kept:
            self.logits.append(np.asarray(out[LOGITS], dtype=np.float64))
        self.calls += 1
        return out


def _stream(phase: str, reference: Runner, io: GraphIO, steps: int, tokens: np.ndarray,
            oracle: Runner | None = None, state: Mapping[str, np.ndarray] | None = None) -> GoldenRecord:  # fmt: skip
    """A stream of ``steps`` calls driven as ``compare`` drives it (``run_stream``)."""
    kept = kept_calls(steps)
    tape, fp64 = _Tape(io, kept), _OracleTape(oracle, kept) if oracle is not None else None
    state = None if state is None else {k: np.array(v) for k, v in state.items()}
    run_stream(reference, None, io, steps, tokens=tokens, state=state, record=tape, oracle=fp64)  # type: ignore[arg-type]
    logits = np.stack(tape.logits)
    delta = None if fp64 is None else (np.stack(fp64.logits) - logits.astype(np.float64)).astype(np.float32)
    final = {k: np.array(v) for k, v in tape.last.items() if k != LOGITS}
    start = tape.start if any(np.any(v != 0) for v in tape.start.values()) else None
    return GoldenRecord(phase, np.concatenate(tape.tokens, axis=1), False, kept, logits, final, start, delta)


def _whole_prompt(reference: Runner, io: GraphIO, prompt: np.ndarray) -> GoldenRecord:
    """One call of a whole prompt from the zero state."""
    out = infer_arrays(reference, {**token_feeds(io, prompt), **zero_state(io, prompt.shape[0])})
    final = {k: v for k, v in out.items() if k != LOGITS}
    return GoldenRecord("prefill", prompt, True, np.array([prompt.shape[1] - 1]), out[LOGITS][None], final)


def record_golden(
    reference: Runner,
    io: GraphIO,
    *,
    prompts: Sequence[np.ndarray] | None = None,
    tokens: np.ndarray | None = None,
    steps: int = DECODE_STEPS,
    long_steps: int = LONG_STEPS,
    prefill: tuple[Runner, GraphIO] | None = None,
    oracle: Runner | None = None,
    state: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    info: Mapping | None = None,
) -> Golden:
    """Run the reference alone through ``compare``'s phases and keep what their checks need.

    Same arguments as ``compare``: ``prompts`` (random ones from ``seed`` when None; ()
    skips them) go through ``prefill`` = (reference prefill runner, its io) whole, else
    through ``reference`` (whole where its graph takes them, else token by token);
    ``steps`` decode steps and a ``long_steps`` stream (0 skips either) start with
    ``tokens`` when given, else a token drawn from ``seed`` (``seed + 1`` for the long
    stream). ``oracle``, the step model in fp64, picks the long stream's tokens and its
    logits are kept beside the reference's, so that drift is judged against fp64 on replay.
    ``state``: where both streams start (zeros when None; kept only when not zero).
    """
    pre, pre_io = prefill or (reference, io)
    prompts = random_prompts(pre_io, seed=seed) if prompts is None else [as_tokens(p) for p in prompts]
    records = []
    for prompt in prompts:
        if takes_whole_prompt(pre_io, prompt.shape[1]):
            records.append(_whole_prompt(pre, pre_io, prompt))
        else:
            records.append(_stream("prefill", reference, io, prompt.shape[1], prompt))
    for phase, count, phase_seed, fp64 in (
        ("decode", steps, seed, None),
        ("long_stream", long_steps, seed + 1, oracle),
    ):
        if count:
            first = _first_tokens(io, tokens, phase_seed)
            records.append(_stream(phase, reference, io, count, first, fp64, state))
    meta = {"reference": describe_runner(reference), "seed": seed, **dict(info or {})}
    if oracle is not None and long_steps:
        meta["oracle"] = describe_runner(oracle)
    return Golden(records, io, meta, pre_io if prefill is not None else None)


def _first_tokens(io: GraphIO, tokens: np.ndarray | None, seed: int) -> np.ndarray:
    if tokens is not None:
        return as_tokens(tokens)
    return np.random.default_rng(seed).integers(0, vocab_size(io), size=(1, 1), dtype=np.int64)


# --- replaying ------------------------------------------------------------------------


def _play(rec: GoldenRecord, runner: Runner, io: GraphIO, whole: bool) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(index of the last token taken, outputs) of each call the candidate makes: one call
    of the whole prompt, or one per token with its own state fed back. Stops early where
    an output could not be fed back (missing or misshapen: the comparison says which)."""
    tokens = rec.tokens
    state = {k: v.copy() for k, v in rec.start.items()} if rec.start is not None else zero_state(io, tokens.shape[0])
    if whole:
        yield tokens.shape[1] - 1, infer_arrays(runner, {**token_feeds(io, tokens), **state})
        return
    for t in range(tokens.shape[1]):
        out = infer_arrays(runner, {**token_feeds(io, np.ascontiguousarray(tokens[:, t : t + 1])), **state})
        yield t, out
        if _broken(out, rec):
            return
        state = {past: out[present] for past, present in io.state_pairs}


def _broken(out: Mapping[str, np.ndarray], rec: GoldenRecord) -> set[str]:
    """The outputs that cannot be fed back: missing, or not shaped as the reference's."""
    return {k for k, v in rec.final.items() if k not in out or np.shape(out[k]) != v.shape}


class _PhaseReplay:
    """One phase's judgement: the logits of every kept call (``Comparison`` over the
    logits, with the fp64 oracle's where recorded) and every other output after each
    record's last token (a second ``Comparison``, whose logits statistics are dropped:
    the first has them all)."""

    def __init__(self, phase: str, final: Sequence[str]):
        self.phase, self.calls_run = phase, 0
        self.logits = Comparison(phase, [LOGITS])
        self.ends = Comparison(phase, [LOGITS, *final])

    @property
    def comparable(self) -> bool:
        return self.logits.comparable and self.ends.comparable

    def replay(self, rec: GoldenRecord, runner: Runner, io: GraphIO, whole: bool) -> None:
        position = {int(t): k for k, t in enumerate(rec.kept)}
        last = rec.tokens.shape[1] - 1
        for t, out in _play(rec, runner, io, whole):
            self.calls_run += 1
            if (k := position.get(t)) is not None:
                oracle = {LOGITS: rec.oracle_logits(k)} if rec.oracle_delta is not None else None
                if not self.logits.add({LOGITS: rec.logits[k]}, out, oracle=oracle):
                    return
            if t == last or _broken(out, rec):
                self._end(rec, out)
                return

    def _end(self, rec: GoldenRecord, out: Mapping[str, np.ndarray]) -> None:
        """Compare the outputs after a record's last token. Where the candidate was cut short
        (an output missing or misshapen) the reference's values stand in for the others,
        so that only the break is reported."""
        reference = {LOGITS: rec.logits[-1], **rec.final}
        if broken := _broken(out, rec):
            out = {k: v for k, v in reference.items() if k not in broken} | {k: out[k] for k in broken if k in out}
        oracle = {LOGITS: rec.oracle_logits(-1)} if rec.oracle_delta is not None else None  # the same checks' names
        self.ends.add(reference, out, oracle=oracle)

    def result(self, tolerance: Tolerance, state_rel_l2: float | None) -> PhaseResult:
        on_logits, on_rest = (c.result(tolerance, state_rel_l2=state_rel_l2) for c in (self.logits, self.ends))
        rest = {k: v for k, v in on_rest.outputs.items() if k != LOGITS}
        failures = on_logits.failures + [f for f in on_rest.failures if f.output != LOGITS]
        checks = tuple(dict.fromkeys(on_logits.checks + on_rest.checks))  # the states' own, e.g. prefill_state
        return PhaseResult(self.phase, on_logits.calls, on_logits.outputs | rest, on_logits.series, failures, checks,
                           on_logits.oracle_drift)  # fmt: skip


def compare_golden(
    candidate: Runner,
    golden: Golden | str | Path,
    *,
    tolerance: Tolerance | str = "fp32",
    prefill_candidate: Runner | None = None,
    state_rel_l2: float | None = None,
) -> CompareResult:
    """Replay a golden file through the candidate and judge each phase as ``compare`` does
    (``results.PHASE_CHECKS``; the long stream against the recorded fp64 logits).

    The candidate feeds back its own state within every prompt and stream, so drift
    accumulates as in deployment. prefill_candidate takes the prompts the reference took
    whole (a prefill graph), and is then held to the step candidate fed the same prompts
    token by token (the "handoff" phase, ``compare_handoff``); without one, the step
    candidate takes the prompts token by token.
    A phase's ``calls`` and series count the calls whose logits were kept;
    ``settings["calls_run"]`` counts all, and ``settings["series_steps"]`` gives the step
    of each series entry of a one-stream phase (the long stream).
    """
    source = str(golden) if isinstance(golden, (str, Path)) else None
    golden = load_golden(golden) if source is not None else golden
    precision, tol = resolve_tolerance(tolerance)
    replays: dict[str, _PhaseReplay] = {}
    for rec in golden.records:
        replay = replays.setdefault(rec.phase, _PhaseReplay(rec.phase, list(rec.final)))
        if replay.comparable:
            whole = rec.whole and prefill_candidate is not None
            io = (golden.prefill_io or golden.io) if whole else golden.io  # a prefill graph also takes a mask
            replay.replay(rec, prefill_candidate if whole else candidate, io, whole)
    streams = {p: [r for r in golden.records if r.phase == p] for p in replays}
    reference = dict(golden.info.get("reference") or {"name": "golden", "type": "golden", "device": "unknown"})
    settings = {"golden": source, "records": len(golden.records), "state_rel_l2": state_rel_l2,
                "calls_run": {p: r.calls_run for p, r in replays.items()},
                "series_steps": {p: rs[0].kept.tolist() for p, rs in streams.items() if len(rs) == 1 and not rs[0].whole}}  # fmt: skip
    oracle = golden.info.get("oracle")
    result = CompareResult(precision, tol, reference, describe_runner(candidate), settings=settings, oracle=oracle)
    for phase, replay in replays.items():
        result.phases[phase] = replay.result(tol, state_rel_l2)
        prompts = [r.tokens for r in golden.records if r.whole]
        if phase == "prefill" and prefill_candidate is not None and golden.prefill_io is not None and prompts:
            result.phases["handoff"] = compare_handoff(prefill_candidate, candidate, golden.prefill_io, golden.io,
                                                       prompts, tolerance=tol)  # fmt: skip
    return result
