"""How far a stream's candidate and fp32 reference strayed from the fp64 oracle, and the
drift rule's verdict on that (the rule and its constants: ``export.spec.drift_within``).

``edgeseq.validate.results.Comparison`` fills one ``OracleDrift`` per stream it is given
the oracle's outputs for: the long stream, when ``compare`` gets an ``oracle``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeseq.export.spec import DRIFT_FLOOR, DRIFT_RATIO, drift_limit, drift_within

RULE = f"max |candidate - fp64| <= max({DRIFT_RATIO:g} x max |reference - fp64|, {DRIFT_FLOOR:g})"


@dataclass
class OracleDrift:
    """Per call of a stream, the max abs logit distance from the fp64 oracle of the
    candidate and of the fp32 reference, and the drift rule's verdict on their maxima.
    ``judged`` is False where the precision does not judge drift: both are reported."""

    candidate: list[float]  # [calls], max |candidate logits - fp64 logits| per call
    reference: list[float]  # [calls], max |reference logits - fp64 logits| per call
    judged: bool

    @property
    def candidate_max(self) -> float:
        return max(self.candidate, default=0.0)

    @property
    def reference_max(self) -> float:
        return max(self.reference, default=0.0)

    @property
    def ratio(self) -> float:
        """candidate_max / reference_max: how much further from fp64 the candidate ends."""
        c, r = self.candidate_max, self.reference_max
        if not math.isfinite(r):
            return math.nan
        if r == 0.0:
            return 0.0 if c == 0.0 else math.inf
        return c / r

    @property
    def limit(self) -> float:
        return drift_limit(self.reference_max)

    @property
    def within(self) -> bool:
        """Does the candidate meet the rule (judged or not)?"""
        return drift_within(self.candidate_max, self.reference_max)

    @property
    def passed(self) -> bool:
        return self.within or not self.judged

    def first_over(self) -> int | None:
        """The first call whose candidate distance is past the limit, or None."""
        return next((i for i, v in enumerate(self.candidate) if not v <= self.limit), None)

    def to_dict(self) -> dict:
        return {
            "candidate": list(self.candidate),
            "reference": list(self.reference),
            "candidate_max": self.candidate_max,
            "reference_max": self.reference_max,
            "ratio": self.ratio,
            "limit": self.limit,
            "rule": {"ratio": DRIFT_RATIO, "floor": DRIFT_FLOOR, "text": RULE},
            "judged": self.judged,
            "within": self.within,
            "passed": self.passed,
        }  # fmt: skip

    def summary(self) -> str:
        """One line: both distances, their ratio, the limit and the verdict."""
        c, r = self.candidate_max, self.reference_max
        distances = f"candidate {c:.3g}, fp32 reference {r:.3g} (ratio {self.ratio:.3g})"
        rule = f"limit {self.limit:.3g} = max({DRIFT_RATIO:g} x reference, {DRIFT_FLOOR:g})"
        if not self.judged:
            return f"{distances}; reported, not judged ({rule})"
        return f"{distances}; {'within' if self.within else 'past'} {rule}"
