"""The onnxruntime-genai verdict: equal greedy streams, or a parting at a near tie."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseq.deploy.genai_check import GenaiCheck


def stream(first, tie, diff):
    return {"prompt": 3, "tokens": 64, "first_difference": first, "near_tie": tie, "max_abs_logit": diff}


def test_a_parting_passes_only_at_a_near_tie_and_within_the_logit_limit():
    limit = float(np.random.uniform(0.1, 1.0))
    assert GenaiCheck(limit, [stream(None, False, limit / 2), stream(12, True, limit / 3)])
    assert not GenaiCheck(limit, [stream(None, False, limit / 2), stream(12, False, limit / 3)])  # a real difference
    assert not GenaiCheck(limit, [stream(None, False, limit * 1.01)])  # equal tokens, logits too far apart
    assert not GenaiCheck(limit, [stream(5, True, limit * 2)])  # a tie after logits already drifted
    assert "1 parted at a near tie" in GenaiCheck(limit, [stream(None, False, 0.0), stream(7, True, 0.0)]).summary()


def test_the_genai_limit_rises_with_the_rounding_validation_measured():
    """At 130M an fp32 graph run twice differs by more than the absolute 1e-4: the limit
    follows what the reference showed against fp64 (the largest over flavors), never lower."""
    from types import SimpleNamespace

    from edgeseq.deploy.validation import handoff_limit
    from edgeseq.export.spec import ROUNDING_RATIO, TOLERANCES

    def ran(logit):
        return SimpleNamespace(compare=SimpleNamespace(settings={"rounding": {"logit": logit, "state": 1e-6}}))

    rng = np.random.default_rng()
    small, large = rng.uniform(1e-7, 1e-6), rng.uniform(2e-4, 8e-4)
    assert handoff_limit("fp32", {}) == TOLERANCES["fp32"].handoff_logit
    assert handoff_limit("fp32", {"a": ran(small)}) == TOLERANCES["fp32"].handoff_logit
    assert handoff_limit("fp32", {"a": ran(small), "b": ran(large)}) == pytest.approx(ROUNDING_RATIO * large)
    assert handoff_limit("int4", {"a": ran(large)}) == TOLERANCES["int4"].handoff_logit
