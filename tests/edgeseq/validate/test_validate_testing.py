"""edgeseq.testing: the parity assertions users put in their CI."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgeseq.testing import assert_parity
from edgeseq.validate.report import load_report
from tests.edgeseq.validate.validate_toy import ToyRunner, toy_io

SMALL = {"steps": 6, "long_steps": 30, "prompts": [np.array([2, 7, 1])]}


@pytest.fixture
def seed():
    return int(np.random.default_rng().integers(2**31))


def test_assert_parity_returns_the_result_when_it_holds(seed):
    result = assert_parity(ToyRunner(seed), ToyRunner(seed), toy_io(), "fp16", seed=seed, **SMALL)
    assert result and set(result.phases) == {"prefill", "decode", "long_stream"}


def test_assert_parity_fails_with_a_readable_summary(tmp_path, seed):
    report, plot = tmp_path / "parity.json", tmp_path / "drift.png"
    with pytest.raises(AssertionError) as info:
        assert_parity(ToyRunner(seed, "ref"), ToyRunner(seed, "cand", logit_offset=0.2), toy_io(), "fp32",
                      seed=seed, report=report, plot=plot, **SMALL)  # fmt: skip
    lines = str(info.value).splitlines()
    assert lines[0].startswith("FAIL: ref vs cand at fp32")
    assert any(re.fullmatch(r"  decode/logits: max_abs_logit 0\.(2|19)\d* > limit 0\.0001 \(first at call 0\)", x) for x in lines)
    assert lines[-1] == f"report: {report}"
    assert load_report(report)["passed"] is False and plot.stat().st_size > 0  # written before raising
