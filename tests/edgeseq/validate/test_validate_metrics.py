"""Error statistics against hand-computed values, on fresh random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeseq.validate.metrics import (
    ErrorAccumulator,
    kl_per_row,
    log_softmax,
    output_stats,
)


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_identical_arrays_have_no_error(rng):
    r = rng.normal(size=(3, 5, 17)).astype(np.float32)
    s = output_stats("logits", r, r.copy(), logits=True)
    assert (s.max_abs, s.mean_abs, s.rel_l2, s.nonfinite) == (0.0, 0.0, 0.0, 0)
    assert s.cosine == pytest.approx(1.0, abs=1e-12)
    assert s.top1_agreement == 1.0 and s.rows == 15
    assert s.kl == pytest.approx(0.0, abs=1e-15)


def test_kl_matches_the_direct_formula(rng):
    r, c = rng.normal(size=(4, 3, 9)) * 3, rng.normal(size=(4, 3, 9)) * 3
    p = np.exp(r) / np.exp(r).sum(-1, keepdims=True)
    q = np.exp(c) / np.exp(c).sum(-1, keepdims=True)
    direct = np.sum(p * np.log(p / q), axis=-1).mean()
    assert output_stats("logits", r, c, logits=True).kl == pytest.approx(direct, rel=1e-10, abs=1e-14)
    assert kl_per_row(r, c).shape == (12,)


def test_kl_and_log_softmax_are_shift_invariant_and_stable(rng):
    r, c = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    shifted = kl_per_row(r + 1e4, c - 3e4)  # naive exp overflows here
    assert np.all(np.isfinite(shifted))
    np.testing.assert_allclose(shifted, kl_per_row(r, c), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(np.exp(log_softmax(r + 1e4)).sum(-1), 1.0, rtol=1e-12)


def test_top1_of_a_rolled_candidate(rng):
    r = rng.normal(size=(10, 7))
    c = r.copy()
    c[:4] = np.roll(r[:4], 1, axis=-1)  # argmax moves by one place in exactly 4 rows
    assert output_stats("logits", r, c, logits=True).top1_agreement == pytest.approx(0.6)
    assert output_stats("logits", r, np.roll(r, 1, axis=-1), logits=True).top1_agreement == 0.0


def test_rel_l2_and_cosine_by_hand():
    s = output_stats("x", np.array([3.0, 4.0]), np.array([3.0, 5.0]))
    assert s.max_abs == 1.0 and s.mean_abs == 0.5
    assert s.rel_l2 == pytest.approx(1 / 5)
    assert s.cosine == pytest.approx(29 / (5 * math.sqrt(34)))
    assert s.top1_agreement is None and s.kl is None


def test_zero_reference_edges():
    zero = np.zeros(4)
    assert output_stats("x", zero, zero).cosine == 1.0
    assert output_stats("x", zero, zero).rel_l2 == 0.0
    assert output_stats("x", zero, np.ones(4)).rel_l2 == math.inf


def test_nonfinite_candidate_is_an_infinite_error(rng):
    r = rng.normal(size=(2, 6))
    c = r.copy()
    c[1, 2], c[0, 0] = np.nan, np.inf
    s = output_stats("logits", r, c, logits=True)
    assert s.nonfinite == 2 and s.max_abs == math.inf and s.rel_l2 == math.inf and s.kl == math.inf
    both = r.copy()
    both[0, 1] = np.nan  # NaN in the reference and the candidate alike is agreement
    assert output_stats("x", both, both.copy()).nonfinite == 0


def test_accumulating_calls_equals_one_concatenated_call(rng):
    pairs = [(rng.normal(size=(1, t, 9)), rng.normal(size=(1, t, 9))) for t in (1, 4, 2)]
    acc = ErrorAccumulator("logits", logits=True)
    per_call = [acc.add(r, c) for r, c in pairs]
    whole = output_stats("logits", *(np.concatenate(x, axis=1) for x in zip(*pairs)), logits=True)
    s = acc.stats()
    assert s.calls == 3 and s.rows == whole.rows == 7
    assert s.max_abs == pytest.approx(whole.max_abs) == pytest.approx(max(per_call))
    for field in ("mean_abs", "rel_l2", "cosine", "top1_agreement", "kl"):
        assert getattr(s, field) == pytest.approx(getattr(whole, field), rel=1e-12), field


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        ErrorAccumulator("x").add(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_fp32_pairs_give_the_statistics_of_an_fp64_computation(rng, scale):
    """fp32 outputs are differenced in fp32 and summed in fp64 (no fp64 copies of a 20 MB
    state): the statistics match a float64 computation of the same pairs."""
    r = (scale * rng.standard_normal((7, 3001))).astype(np.float32)
    c = (r + scale * 1e-4 * rng.standard_normal(r.shape)).astype(np.float32)
    got = output_stats("x", r, c)
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    d = c64 - r64
    assert got.max_abs == pytest.approx(np.abs(d).max(), rel=1e-6)
    assert got.mean_abs == pytest.approx(np.abs(d).mean(), rel=1e-6)
    assert got.rel_l2 == pytest.approx(np.linalg.norm(d) / np.linalg.norm(r64), rel=1e-5)
    huge = r.copy()
    huge[0, 0], c[0, 0] = 3e38, -3e38  # overflows in fp32 only: judged in fp64 instead
    assert output_stats("x", huge, c).nonfinite == 0 and output_stats("x", huge, c).max_abs == pytest.approx(6e38)
