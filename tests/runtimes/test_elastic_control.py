"""The width controllers (``LatencyBudget``) and ``edgeseq run``'s budget schedule."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from edgeseq.deploy.run import BudgetSchedule
from edgeseq.errors import UsageError
from edgeseq.runtimes.elastic import LatencyBudget, StepStats

WIDTHS = ["1", "1/2", "1/4"]


def drive(control: LatencyBudget, cost: dict[str, float], steps: int, start: str = "1", noise: float = 0.0,
          budget: dict[int, float] | None = None) -> list[str]:  # fmt: skip
    rng, width, seen = np.random.default_rng(), start, []
    for t in range(1, steps + 1):
        if budget and t in budget:
            control.budget_ms = budget[t]
        ms = cost[width] * (1 + noise * rng.uniform(-1, 1))
        width = control.on_step(StepStats(t, width, ms))
        seen.append(width)
    return seen


def test_keeps_the_widest_width_that_fits():
    cost = {"1": 3.0, "1/2": 1.6, "1/4": 0.9}
    for budget, want in [(10.0, "1"), (2.0, "1/2"), (1.0, "1/4"), (0.5, "1/4")]:  # nothing fits: the narrowest
        seen = drive(LatencyBudget(WIDTHS, budget, settle=4, probe_every=50), cost, 200, noise=0.1)
        assert seen[-1] == want and seen[-20:].count(want) >= 19, (budget, seen[-20:])


def test_a_tightened_budget_narrows_and_a_loosened_one_widens_again():
    cost = {"1": 3.0, "1/2": 1.6, "1/4": 0.9}
    control = LatencyBudget(WIDTHS, 5.0, settle=4, probe_every=1000)
    seen = drive(control, cost, 300, budget={100: 1.0, 200: 5.0})
    assert set(seen[:99]) == {"1"}
    first = seen.index("1/4", 99)
    assert first <= 100 + 2 * 4 + 1 and set(seen[first:199]) == {"1/4"}
    assert seen[-1] == "1" and seen.index("1", 199) <= 200 + 2 * 4 + 1  # known to fit again: no waiting for a probe


def test_a_width_that_did_not_fit_is_probed_again_later():
    cost = {"1": 3.0, "1/2": 1.0, "1/4": 0.5}
    control = LatencyBudget(WIDTHS, 2.0, settle=4, probe_every=40)
    seen = drive(control, cost, 200)
    probes = [t for t in range(1, len(seen)) if seen[t] == "1" and seen[t - 1] == "1/2"]
    assert len(probes) >= 3 and all(b - a >= 40 for a, b in pairwise(probes))
    assert seen.count("1/2") > 0.8 * len(seen)


def test_budget_schedule():
    schedule = BudgetSchedule.parse("40, 10@200,5@300")
    assert [schedule.at(t) for t in (0, 199, 200, 299, 300, 10**6)] == [40, 40, 10, 10, 5, 5]
    for bad in ("", "x", "0", "40,10", "40@5,10@20", "40,-1@9"):
        with pytest.raises(UsageError, match="latency-budget-ms"):
            BudgetSchedule.parse(bad)
    with pytest.raises(UsageError):
        LatencyBudget(WIDTHS, 0)
