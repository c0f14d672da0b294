"""The onnxruntime-genai verdict: equal greedy streams, or a parting at a near tie."""

from __future__ import annotations

import numpy as np

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
