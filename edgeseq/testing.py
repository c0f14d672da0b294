"""Parity assertions for users' CI: does a deployed graph still match the reference?

    from edgeseq.testing import assert_bundle_parity

    def test_bundle_matches_reference():
        assert_bundle_parity("out/mamba2-tiny-fp16", report="out/parity.json")

Each raises ``AssertionError`` whose message lists every failure in one line each, and
returns the ``CompareResult`` when parity holds. Built on ``edgeseq.validate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgeseq.export.spec import GraphIO, Tolerance
from edgeseq.validate.compare import DECODE_STEPS, LONG_STEPS, Runner, compare
from edgeseq.validate.golden import Golden, compare_golden
from edgeseq.validate.report import plot_drift, write_report
from edgeseq.validate.results import CompareResult

LoadRunners = Callable[[Path], tuple[Runner, Runner, GraphIO, str]]


def assert_parity(
    reference_runner: Runner,
    candidate_runner: Runner,
    io: GraphIO | None = None,
    precision: str | Tolerance = "fp32",
    *,
    steps: int = DECODE_STEPS,
    long_steps: int = LONG_STEPS,
    prompts: Sequence[np.ndarray] | None = None,
    seed: int = 0,
    tokens: np.ndarray | None = None,
    prefill: tuple[Runner, Runner, GraphIO] | None = None,
    state_rel_l2: float | None = None,
    report: str | Path | None = None,
    plot: str | Path | None = None,
) -> CompareResult:
    """Compare two active runners (``edgeseq.validate.compare``: prompts, ``steps`` decode
    steps, a ``long_steps`` stream) against ``TOLERANCES[precision]``. ``io`` defaults to
    ``reference_runner.io``; ``report`` and ``plot`` paths, when given, receive the JSON
    report and the drift PNG, pass or fail."""
    result = compare(
        reference_runner, candidate_runner, io, tolerance=precision, prompts=prompts, steps=steps,
        long_steps=long_steps, seed=seed, tokens=tokens, prefill=prefill, state_rel_l2=state_rel_l2,
    )  # fmt: skip
    _record_and_judge(result, report, plot)
    return result


def assert_golden_parity(
    candidate_runner: Runner,
    golden: Golden | str | Path,
    precision: str | Tolerance = "fp32",
    *,
    feed_back: bool = True,
    report: str | Path | None = None,
) -> CompareResult:
    """Compare a candidate with a golden file, without torch."""
    result = compare_golden(candidate_runner, golden, tolerance=precision, feed_back=feed_back)
    _record_and_judge(result, report, None)
    return result


def assert_bundle_parity(
    bundle_dir: str | Path,
    *,
    load_runners: LoadRunners | None = None,
    steps: int = DECODE_STEPS,
    long_steps: int = LONG_STEPS,
    prompts: Sequence[np.ndarray] | None = None,
    seed: int = 0,
    report: str | Path | None = None,
    plot: str | Path | None = None,
) -> CompareResult:
    """``assert_parity`` on a bundle: ``load_runners(bundle_dir)`` returns (reference
    runner, candidate runner, io, precision), by default ``edgeseq.deploy.validation.load_runners``.
    Runners that are context managers are activated here and deactivated after."""
    if load_runners is None:
        from edgeseq.deploy.validation import load_runners
    reference, candidate, io, precision = load_runners(Path(bundle_dir))
    with contextlib.ExitStack() as stack:
        reference, candidate = _enter(stack, reference), _enter(stack, candidate)
        return assert_parity(
            reference, candidate, io, precision, steps=steps, long_steps=long_steps, prompts=prompts,
            seed=seed, report=report, plot=plot,
        )  # fmt: skip


def _enter(stack: contextlib.ExitStack, runner: Runner) -> Runner:
    if not hasattr(runner, "__enter__"):
        return runner
    entered = stack.enter_context(runner)  # type: ignore[arg-type]
    return runner if entered is None else entered


def _record_and_judge(result: CompareResult, report: str | Path | None, plot: str | Path | None) -> None:
    if report is not None:
        write_report(result, report)
    if plot is not None and "long_stream" in result.phases:
        plot_drift(result, plot)
    if not result:
        where = f"\nreport: {report}" if report is not None else ""
        raise AssertionError(result.summary() + where)
