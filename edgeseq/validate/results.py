"""Reference-vs-candidate results: accumulated statistics, typed failures, pass/fail.

A ``Comparison`` folds in the outputs of many calls (a phase: prefill prompts, decode
steps, one long stream) and judges them against a ``Tolerance``; its ``PhaseResult`` and
the ``CompareResult`` of all phases are truthy exactly when they pass. How runners are
driven to produce those outputs lives in ``edgeseq.validate.compare``, which re-exports
everything here.

What is judged, per phase (``PHASE_CHECKS``):
  prefill:                  last logits max abs <= prefill_logit, top-1, KL; every state the
                            prefill hands to decode: relative L2 <= prefill_state
  handoff:                  the candidate's prefill graph against its own step graph fed the
                            same prompt token by token: the same two checks, at the
                            tolerance's ``handoff()`` limits (both sides at one precision)
  decode:                   logits max abs <= max_abs_logit, top-1 >= top1_agreement, KL <= kl
  long_stream:              logits max abs <= drift, KL <= kl; with an fp64 oracle, drift
                            gives way to drift_fp64: the candidate's distance from fp64
                            within ``export.spec.drift_within`` of the fp32 reference's
  held_out_only precisions: top-1 on decode, prefill_logit and prefill_state on prefill and
                            handoff (held-out text is judged elsewhere)
  every phase:              every output present, shapes equal, no stray non-finite values,
                            integer outputs (present.position) exactly equal,
                            float states rel L2 <= state_rel_l2 when one is given
  beside an fp64 oracle:    the limits of a phase whose calls the oracle also ran rise to
                            ``ROUNDING_RATIO`` x the fp32 reference's own distance from fp64
                            (``Tolerance.beside_rounding``; the prompts' is measured by
                            ``compare.reference_rounding``)
States are otherwise judged through their effect on later logits, which is what the
long stream measures; per-state statistics are always reported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np

from edgeseq.errors import EdgeseqError, UsageError
from edgeseq.export.spec import DRIFT_FLOOR, DRIFT_RATIO, TOLERANCES, Tolerance
from edgeseq.validate.drift import OracleDrift
from edgeseq.validate.metrics import ErrorAccumulator, OutputStats, abs_error

LOGITS = "logits"
PHASE_CHECKS: dict[str, tuple[str, ...]] = {
    "prefill": ("prefill_logit", "top1_agreement", "kl", "prefill_state"),
    "handoff": ("prefill_logit", "prefill_state"),
    "decode": ("max_abs_logit", "top1_agreement", "kl"),
    "long_stream": ("drift", "kl"),
}
# What a held_out_only tolerance (fp16, int8, int4) judges here; held-out text is judged
# by edgeseq.validate.heldout, everything else is reported.
HELD_OUT_ONLY_CHECKS: dict[str, tuple[str, ...]] = {
    "decode": ("top1_agreement",),
    "prefill": ("prefill_logit", "prefill_state"),
    "handoff": ("prefill_logit", "prefill_state"),
}
DRIFT_FP64 = "drift_fp64"  # the long stream's check when an fp64 oracle ran beside it
_AT_LEAST = {"top1_agreement"}  # every other check is an upper limit
_MAX_ABS = {"max_abs_logit", "prefill_logit", "drift"}  # judged on the per-call series: the first call over is named


class UnknownPrecisionError(EdgeseqError):
    """A precision name with no tolerance in ``export.spec.TOLERANCES``."""


def resolve_tolerance(tolerance: Tolerance | str) -> tuple[str | None, Tolerance]:
    """(precision name or None, tolerance) from a precision name or a ``Tolerance``."""
    if isinstance(tolerance, Tolerance):
        named = [k for k, v in TOLERANCES.items() if v == tolerance]
        return (named[0] if named else None), tolerance
    if tolerance not in TOLERANCES:
        raise UnknownPrecisionError(f"no tolerance for precision {tolerance!r}; use one of {', '.join(TOLERANCES)}")
    return tolerance, TOLERANCES[tolerance]


# --- typed failures -------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """Why a phase failed, for one output."""

    kind: ClassVar[str] = "failure"
    phase: str
    output: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self), "message": str(self)}


@dataclass(frozen=True)
class MissingOutput(Failure):
    kind: ClassVar[str] = "missing_output"
    side: str  # "reference" or "candidate"
    call: int

    def __str__(self) -> str:
        return f"{self.phase}/{self.output}: missing from the {self.side}'s outputs (call {self.call})"


@dataclass(frozen=True)
class ShapeMismatch(Failure):
    kind: ClassVar[str] = "shape_mismatch"
    shape: tuple[int, ...]
    expected: tuple[int, ...]
    call: int

    def __str__(self) -> str:
        return f"{self.phase}/{self.output}: candidate shape {self.shape} != reference {self.expected} (call {self.call})"


@dataclass(frozen=True)
class NonFinite(Failure):
    kind: ClassVar[str] = "nonfinite"
    count: int  # over the whole phase
    call: int  # first call with one

    def __str__(self) -> str:
        return f"{self.phase}/{self.output}: {self.count} non-finite candidate values, first at call {self.call}"


@dataclass(frozen=True)
class ToleranceExceeded(Failure):
    kind: ClassVar[str] = "tolerance"
    metric: str  # a Tolerance field, "exact" (integer outputs) or "state_rel_l2" (a limit given by the caller)
    value: float
    limit: float
    call: int | None = None  # first call past the limit, where a per-call series exists

    def __str__(self) -> str:
        op = "<" if self.metric in _AT_LEAST else ">"
        where = f" (first at call {self.call})" if self.call is not None else ""
        return f"{self.phase}/{self.output}: {self.metric} {self.value:.6g} {op} limit {self.limit:.6g}{where}"


@dataclass(frozen=True)
class DriftExceeded(Failure):
    """The candidate strayed further from fp64 than the drift rule allows (``export.spec``)."""

    kind: ClassVar[str] = DRIFT_FP64
    candidate: float  # max abs logit distance from fp64 over the stream
    reference: float  # the fp32 reference's, on the same stream
    limit: float  # drift_limit(reference)
    call: int | None  # first call past the limit

    def __str__(self) -> str:
        where = f", first at call {self.call}" if self.call is not None else ""
        return (
            f"{self.phase}/{self.output}: {self.candidate:.3g} from fp64 > limit {self.limit:.3g} "
            f"(max({DRIFT_RATIO:g} x the fp32 reference's {self.reference:.3g}, {DRIFT_FLOOR:g}){where})"
        )


# --- results --------------------------------------------------------------------------


@dataclass
class PhaseResult:
    """One phase's statistics per output and its failures; truthy when it passes."""

    phase: str
    calls: int
    outputs: dict[str, OutputStats]
    series: dict[str, list[float]]  # per-call max abs error, for the outputs that keep one
    failures: list[Failure]
    checks: tuple[str, ...]
    oracle_drift: OracleDrift | None = None  # distances from fp64, where an oracle ran beside

    def __bool__(self) -> bool:
        return not self.failures

    @property
    def passed(self) -> bool:
        return bool(self)

    def to_dict(self) -> dict:
        body = {
            "phase": self.phase,
            "passed": self.passed,
            "calls": self.calls,
            "checks": list(self.checks),
            "outputs": {name: s.to_dict() for name, s in self.outputs.items()},
            "series": {name: list(v) for name, v in self.series.items()},
            "failures": [f.to_dict() for f in self.failures],
        }
        if self.oracle_drift is not None:
            body["oracle_drift"] = self.oracle_drift.to_dict()
        return body


@dataclass
class CompareResult:
    """Every phase of one reference-vs-candidate comparison; truthy when all pass."""

    precision: str | None
    tolerance: Tolerance
    reference: dict  # describe_runner() of each side
    candidate: dict
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # steps, prompts, seed: what reruns it
    oracle: dict | None = None  # describe_runner() of the fp64 oracle, where one ran

    def __bool__(self) -> bool:
        return all(self.phases.values())

    @property
    def passed(self) -> bool:
        return bool(self)

    @property
    def failures(self) -> list[Failure]:
        return [f for p in self.phases.values() for f in p.failures]

    def summary(self) -> str:
        verdict = "PASS" if self else "FAIL"
        ran = ", ".join(f"{name} {p.calls} calls" for name, p in self.phases.items()) or "nothing compared"
        head = (
            f"{verdict}: {self.reference['name']} vs {self.candidate['name']} "
            f"at {self.precision or 'custom tolerance'}: {ran}"
        )
        fp64 = [f"  {name} vs fp64: {p.oracle_drift.summary()}" for name, p in self.phases.items() if p.oracle_drift]
        return "\n".join([head, *fp64, *(f"  {f}" for f in self.failures)])

    def brief(self, most: int = 3) -> str:
        """One line for an error: the verdict and the first ``most`` failures, with how
        many more the report holds."""
        shown = "; ".join(map(str, self.failures[:most]))
        more = len(self.failures) - most
        return f"{'PASS' if self else 'FAIL'} at {self.precision or 'custom tolerance'}" + (f": {shown}" if shown else "") + (
            f"; and {more} more (export with --no-validate, then `edgeseq validate BUNDLE --report R.json` lists all)"
            if more > 0 else "")  # fmt: skip

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "precision": self.precision,
            "tolerance": asdict(self.tolerance),
            "runners": {"reference": dict(self.reference), "candidate": dict(self.candidate),
                        **({"oracle": dict(self.oracle)} if self.oracle is not None else {})},
            "settings": dict(self.settings),
            "phases": {name: p.to_dict() for name, p in self.phases.items()},
            "failures": [f.to_dict() for f in self.failures],
        }


# --- accumulation ---------------------------------------------------------------------


class Comparison:
    """Accumulates the statistics of every named output over the calls of one phase.

    ``add`` takes one call's outputs from each side and returns False when the call could
    not be compared (an output missing, shapes differing): a stream cannot go on from it.
    Given the fp64 oracle's outputs of the same call too, it also records how far each
    side's logits are from the oracle's; the result then carries an ``OracleDrift``.
    """

    def __init__(self, phase: str, outputs: Sequence[str], logits: str = LOGITS, series: Sequence[str] = (LOGITS,)):
        self.phase, self.outputs, self.logits = phase, tuple(outputs), logits
        if logits not in self.outputs:
            raise UsageError(f"the outputs to compare {list(self.outputs)} lack the logits output {logits!r}")
        self.calls = 0
        self._acc = {name: ErrorAccumulator(name, logits=name == logits) for name in self.outputs}
        self._series: dict[str, list[float]] = {name: [] for name in series if name in self._acc}
        self._integer: set[str] = set()
        self._first_nonfinite: dict[str, int] = {}
        self._structural: list[Failure] = []
        self._from_oracle: dict[str, list[float]] | None = None  # side -> per-call distance

    @property
    def comparable(self) -> bool:
        """False once a call could not be compared; a phase stops there."""
        return not self._structural

    def add(self, reference: Mapping[str, object], candidate: Mapping[str, object],
            oracle: Mapping[str, object] | None = None) -> bool:
        call, self.calls = self.calls, self.calls + 1
        ok = True
        for name in self.outputs:
            for side, outs in (("reference", reference), ("candidate", candidate)):
                if name not in outs:
                    self._structural.append(MissingOutput(self.phase, name, side, call))
                    ok = False
            if name not in reference or name not in candidate:
                continue
            r, c = np.asarray(reference[name]), np.asarray(candidate[name])
            if r.shape != c.shape:
                self._structural.append(ShapeMismatch(self.phase, name, tuple(c.shape), tuple(r.shape), call))
                ok = False
                continue
            if r.dtype.kind in "iub":
                self._integer.add(name)
            acc = self._acc[name]
            before = acc.nonfinite
            call_max = acc.add(r, c)
            if acc.nonfinite > before:
                self._first_nonfinite.setdefault(name, call)
            if name in self._series:
                self._series[name].append(call_max)
        if oracle is not None and ok:
            self.add_oracle(reference, candidate, oracle)
        return ok

    def snapshot(self) -> dict:
        """Everything accumulated so far, for ``restore`` (a chunk of calls taken back)."""
        return copy.deepcopy(self.__dict__)

    def restore(self, snapshot: dict) -> None:
        self.__dict__.update(copy.deepcopy(snapshot))

    def add_oracle(self, reference: Mapping[str, object], candidate: Mapping[str, object],
                   oracle: Mapping[str, object]) -> None:  # fmt: skip
        """How far each side's logits of one call are from the fp64 oracle's (``add`` with
        ``oracle`` calls it; ``run_verified_stream`` calls it once the oracle has run)."""
        truth = np.asarray(oracle[self.logits])
        if truth.dtype != np.float64:  # an fp32 "oracle" would judge fp32 by fp32 again, silently
            raise UsageError(f"the oracle's {self.logits} are {truth.dtype}; run it in fp64: "
                             "TorchRunner(model, dtype='float64')")  # fmt: skip
        if self._from_oracle is None:
            self._from_oracle = {"candidate": [], "reference": []}
        for side, outs in (("candidate", candidate), ("reference", reference)):
            logits = np.asarray(outs[self.logits])
            if logits.shape != truth.shape:
                raise UsageError(f"the oracle's {self.logits} {truth.shape} do not match the {side}'s {logits.shape}")
            self._from_oracle[side].append(float(abs_error(truth, logits).max(initial=0.0)))

    def result(self, tolerance: Tolerance, checks: Sequence[str] | None = None, state_rel_l2: float | None = None) -> PhaseResult:
        if checks is None and tolerance.held_out_only:
            checks = HELD_OUT_ONLY_CHECKS.get(self.phase, ())
        checks = tuple(PHASE_CHECKS.get(self.phase, PHASE_CHECKS["decode"]) if checks is None else checks)
        drift = None
        if self._from_oracle is not None and self._from_oracle["reference"]:  # limits no tighter than rounding
            tolerance = tolerance.beside_rounding(max(self._from_oracle["reference"]), 0.0)
        if self._from_oracle is not None:  # fp64 is the judge of drift: drift_fp64 replaces drift
            drift = OracleDrift(**self._from_oracle, judged="drift" in checks and tolerance.drift is not None)
            checks = tuple(DRIFT_FP64 if c == "drift" else c for c in checks)
        stats = {name: acc.stats() for name, acc in self._acc.items() if acc.calls}
        failures = list(self._structural)
        for s in stats.values():
            failures += self._judge(s, tolerance, checks, state_rel_l2)
        if drift is not None and not drift.passed:
            failures.append(DriftExceeded(self.phase, self.logits, drift.candidate_max, drift.reference_max,
                                          drift.limit, drift.first_over()))  # fmt: skip
        series = {name: list(v) for name, v in self._series.items()}
        return PhaseResult(self.phase, self.calls, stats, series, failures, checks, drift)

    def _judge(self, s: OutputStats, tol: Tolerance, checks: tuple[str, ...], state_rel_l2: float | None) -> list[Failure]:
        out: list[Failure] = []
        if s.nonfinite:
            out.append(NonFinite(self.phase, s.name, s.nonfinite, self._first_nonfinite[s.name]))
        if s.name in self._integer:
            if s.max_abs != 0:
                out.append(ToleranceExceeded(self.phase, s.name, "exact", s.max_abs, 0.0, self._first_over(s.name, 0.0)))
        elif s.name == self.logits:
            values = {"max_abs_logit": s.max_abs, "prefill_logit": s.max_abs, "drift": s.max_abs,
                      "top1_agreement": s.top1_agreement, "kl": s.kl}  # fmt: skip
            for check in (c for c in checks if c in values):  # drift_fp64 is judged on the oracle's series
                value, limit = values[check], getattr(tol, check)
                if not _within(check, value, limit):
                    call = self._first_over(s.name, limit) if check in _MAX_ABS else None
                    out.append(ToleranceExceeded(self.phase, s.name, check, value, limit, call))
        else:  # a float state: the caller's limit everywhere, else the tolerance's where the phase judges states
            metric, limit = ("state_rel_l2", state_rel_l2) if state_rel_l2 is not None else ("prefill_state", None)
            if limit is None and "prefill_state" in checks:
                limit = tol.prefill_state
            if not _within(metric, s.rel_l2, limit):
                out.append(ToleranceExceeded(self.phase, s.name, metric, s.rel_l2, limit))
        return out

    def _first_over(self, name: str, limit: float) -> int | None:
        for i, v in enumerate(self._series.get(name, ())):
            if not v <= limit:
                return i
        return None


def _within(check: str, value: float | None, limit: float | None) -> bool:
    if limit is None:
        return True  # not judged at this precision
    if value is None or math.isnan(value):
        return False  # written so that NaN never passes
    return value >= limit if check in _AT_LEAST else value <= limit
