"""Comparisons of toy runners: pass/fail at the tolerance edges, typed failures, state feedback."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from edgeseq.export.spec import TOLERANCES, Tolerance
from edgeseq.validate.compare import (
    compare,
    compare_decode,
    compare_long_stream,
    compare_prefill,
    runner_device,
    zero_state,
)
from edgeseq.validate.results import (
    Comparison,
    MissingOutput,
    NonFinite,
    ShapeMismatch,
    ToleranceExceeded,
    UnknownPrecisionError,
)
from tests.edgeseq.validate.validate_toy import N, ToyRunner, V, toy_io

LOOSE = Tolerance(max_abs_logit=0.1, top1_agreement=0.9, kl=0.01, drift=0.2, bpb_delta=0.0)


@pytest.fixture
def seed():
    return int(np.random.default_rng().integers(2**31))


def test_identical_runners_pass_every_phase(seed):
    io = toy_io()
    result = compare(ToyRunner(seed), ToyRunner(seed), io, steps=12, long_steps=40, seed=seed)
    assert result and result.passed and not result.failures
    assert set(result.phases) == {"prefill", "decode", "long_stream"}
    assert result.phases["prefill"].calls == 1 + 7 + 33  # a step graph takes prompts token by token
    for phase in result.phases.values():
        assert set(phase.outputs) == {"logits", "present.0.ssm", "present.position"}
        assert all(s.max_abs == 0.0 for s in phase.outputs.values())
    assert result.reference["device"] == "cpu"
    assert result.summary().startswith("PASS")


@pytest.mark.parametrize("precision", ["fp32"])
@pytest.mark.parametrize("factor, passes", [(0.5, True), (2.0, False)])
def test_logit_error_either_side_of_the_limit(precision, factor, passes, seed):
    limit = TOLERANCES[precision].max_abs_logit
    candidate = ToyRunner(seed, logit_offset=factor * limit)  # a constant shift: top-1 and KL unchanged
    result = compare_decode(ToyRunner(seed), candidate, toy_io(), 6, tolerance=precision, seed=seed)
    assert bool(result) is passes
    assert result.outputs["logits"].max_abs == pytest.approx(factor * limit, rel=0.05)  # float32 rounding of logits
    if not passes:
        (failure,) = result.failures
        assert isinstance(failure, ToleranceExceeded)
        assert (failure.phase, failure.output, failure.metric, failure.limit, failure.call) == (
            "decode", "logits", "max_abs_logit", limit, 0,
        )  # fmt: skip


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_quantized_precisions_are_judged_on_argmax_and_kl_not_logit_size(precision, seed):
    shifted = compare_decode(ToyRunner(seed), ToyRunner(seed, logit_offset=5.0), toy_io(), 6, tolerance=precision, seed=seed)
    assert shifted and shifted.outputs["logits"].max_abs == pytest.approx(5.0, rel=1e-3)  # a shift moves no argmax
    assert TOLERANCES[precision].max_abs_logit is None and TOLERANCES[precision].drift is None
    assert TOLERANCES[precision].held_out_only  # greedy streams: top-1 judged, KL reported


def _one_call(comparison: Comparison, r: np.ndarray, c: np.ndarray):
    comparison.add({"logits": r}, {"logits": c})
    return comparison.result(LOOSE)


def test_comparison_edges_are_inclusive():
    rng = np.random.default_rng()
    r = rng.normal(size=(10, V))
    for delta, ok in ((0.1 * (1 - 1e-9), True), (0.1 * (1 + 1e-9), False)):
        assert bool(_one_call(Comparison("decode", ["logits"]), r, r + delta)) is ok
    top1_only = Tolerance(max_abs_logit=1e9, top1_agreement=0.9, kl=1e9, drift=1e9, bpb_delta=0.0)
    c = r.copy()
    c[0] = np.roll(r[0], 1)  # 9 of 10 rows agree: exactly the 0.9 limit
    comparison = Comparison("decode", ["logits"])
    comparison.add({"logits": r}, {"logits": c})
    assert comparison.result(top1_only)
    c[1] = np.roll(r[1], 1)
    comparison = Comparison("decode", ["logits"])
    comparison.add({"logits": r}, {"logits": c})
    assert [f.metric for f in comparison.result(top1_only).failures] == ["top1_agreement"]


def test_kl_limit_and_which_phases_judge_it():
    rng = np.random.default_rng()
    r = rng.normal(size=(8, V))
    kl_only = Tolerance(max_abs_logit=1e9, top1_agreement=1.0, kl=1e-5, drift=1e9, bpb_delta=0.0)
    heldout_only = Tolerance(max_abs_logit=None, top1_agreement=1.0, kl=1e-5, drift=None, bpb_delta=0.0,
                             held_out_only=True)
    for scale, ok in ((1.001, True), (1.5, False)):  # a temperature: KL moves, argmax stays
        for phase in ("decode", "long_stream", "prefill"):
            for tol, judged in ((kl_only, True), (heldout_only, False)):
                comparison = Comparison(phase, ["logits"])
                comparison.add({"logits": r}, {"logits": r * scale})
                result = comparison.result(tol)
                assert bool(result) is (ok or not judged), (phase, result.outputs["logits"].kl)


def test_missing_output_stops_the_phase(seed):
    result = compare_decode(ToyRunner(seed), ToyRunner(seed, drop="present.0.ssm"), toy_io(), 10, seed=seed)
    assert not result and result.calls == 1
    (failure,) = result.failures
    assert isinstance(failure, MissingOutput) and failure.side == "candidate" and failure.output == "present.0.ssm"


def test_shape_mismatch(seed):
    result = compare_decode(ToyRunner(seed), ToyRunner(seed, bad_shape="logits"), toy_io(), 4, seed=seed)
    (failure,) = result.failures
    assert isinstance(failure, ShapeMismatch) and failure.shape == (1, V, 1) and failure.expected == (1, V)


def test_nan_is_a_failure_at_the_call_it_appears(seed):
    result = compare_decode(ToyRunner(seed), ToyRunner(seed, nan_from=3), toy_io(), 5, seed=seed, tolerance="int4")
    kinds = {type(f) for f in result.failures}
    assert NonFinite in kinds and not result
    (nan,) = [f for f in result.failures if isinstance(f, NonFinite)]
    assert nan.call == 3 and nan.count == 2 * V


def test_integer_outputs_must_match_exactly(seed):
    result = compare_decode(ToyRunner(seed), ToyRunner(seed, position_skew=1), toy_io(), 3, seed=seed, tolerance="int4")
    assert [(f.output, f.metric) for f in result.failures] == [("present.position", "exact")]


def test_each_side_feeds_back_its_own_state_and_sees_the_reference_tokens(seed):
    ref, cand = ToyRunner(seed), ToyRunner(seed, a_scale=1.01)
    result = compare_decode(ref, cand, toy_io(), 20, seed=seed, tolerance="int4")
    for side in (ref, cand):
        for before, after in zip(side.seen, side.seen[1:]):
            assert after["position"][0] == before["position"][0] + 1
    # the candidate's past is its own previous present, not the reference's
    assert not np.array_equal(ref.seen[5]["past.0.ssm"], cand.seen[5]["past.0.ssm"])
    # both sides get the same tokens, the reference's argmax
    ref_tokens = [s["input_ids"] for s in ref.seen]
    assert all(np.array_equal(a, s["input_ids"]) for a, s in zip(ref_tokens, cand.seen))
    h = ref.seen[3]["past.0.ssm"].astype(np.float64) @ ref.A.T + ref.E[ref_tokens[3][:, 0]]
    assert ref_tokens[4][0, 0] == np.argmax(h @ ref.C)
    series = result.series["logits"]
    assert len(series) == 20 and series[0] == 0.0 and series[-1] > series[1] > 0  # drift builds up


def test_given_tokens_are_fed_before_argmax(seed):
    ref, cand = ToyRunner(seed), ToyRunner(seed)
    compare_decode(ref, cand, toy_io(), 6, tokens=np.array([3, 1, 4]), seed=seed)
    assert [int(s["input_ids"][0, 0]) for s in cand.seen[:3]] == [3, 1, 4]


def test_long_stream_series_length_and_drift_limit(seed):
    drift = Tolerance(max_abs_logit=0.0, top1_agreement=1.0, kl=1.0, drift=1e-3, bpb_delta=0.0)
    result = compare_long_stream(ToyRunner(seed), ToyRunner(seed, a_scale=1.001), toy_io(), 300, tolerance=drift)
    assert result.calls == len(result.series["logits"]) == 300
    assert result.checks == ("drift", "kl")
    (failure,) = result.failures  # drift and KL are judged on the long stream, not max_abs or top-1
    assert failure.metric == "drift" and failure.call == int(np.argmax(np.array(result.series["logits"]) > 1e-3))


def test_prefill_graph_takes_each_prompt_in_one_call(seed):
    io = toy_io("prefill", position=False)
    ref, cand = ToyRunner(seed), ToyRunner(seed)
    prompts = [np.array([1, 2, 3]), np.array([[4, 5], [6, 7]])]
    result = compare_prefill(ref, cand, io, prompts)
    assert result and result.calls == 2
    assert cand.seen[1]["past.0.ssm"].shape == (2, N) and not cand.seen[1]["past.0.ssm"].any()
    assert set(zero_state(io, 3)) == {"past.0.ssm"}


def test_state_rel_l2_is_judged_only_when_given(seed):
    ref, cand = ToyRunner(seed), ToyRunner(seed, a_scale=1.01)
    loose = Tolerance(max_abs_logit=1e9, top1_agreement=0.0, kl=1e9, drift=1e9, bpb_delta=0.0)
    assert compare_decode(ref, cand, toy_io(), 8, tolerance=loose, seed=seed)
    judged = compare_decode(ToyRunner(seed), ToyRunner(seed, a_scale=1.01), toy_io(), 8, tolerance=loose,
                            seed=seed, state_rel_l2=1e-6)  # fmt: skip
    assert [(f.output, f.metric) for f in judged.failures] == [("present.0.ssm", "state_rel_l2")]


def test_unknown_precision():
    with pytest.raises(UnknownPrecisionError, match="fp32, fp16"):
        compare_decode(ToyRunner(), ToyRunner(), toy_io(), 1, tolerance="fp8")


def test_runner_descriptions_and_io_from_the_reference(seed):
    class OrtLike(ToyRunner):
        device = None
        providers_used = ("CUDAExecutionProvider", "CPUExecutionProvider")
        io = toy_io()

    result = compare(OrtLike(seed, "ort"), ToyRunner(seed), steps=2, long_steps=0, prompts=(), reference_device="cuda:H100")
    assert result and set(result.phases) == {"decode"}
    assert result.reference == {"name": "ort", "type": f"{OrtLike.__module__}.{OrtLike.__qualname__}", "device": "cuda:H100"}
    assert runner_device(OrtLike()) == "CUDAExecutionProvider,CPUExecutionProvider"
    assert runner_device(object()) == "unknown"


def test_both_streams_start_from_given_tokens_and_the_logits_are_required(seed):
    cand = ToyRunner(seed)
    result = compare(ToyRunner(seed), cand, toy_io(), prompts=(), steps=3, long_steps=4, tokens=np.array([[5, 6]]))
    assert [int(s["input_ids"][0, 0]) for s in (cand.seen[0], cand.seen[1], cand.seen[3], cand.seen[4])] == [5, 6, 5, 6]
    assert result.settings["tokens"] == [[5, 6]]
    with pytest.raises(ValueError, match="lack the logits output"):
        Comparison("decode", ["present.0.ssm"])


def test_cuda_devices_are_named_through_an_already_loaded_torch(monkeypatch):
    class Cuda:
        current_device = staticmethod(lambda: 0)
        get_device_name = staticmethod(lambda i: f"NVIDIA H100 #{i}")

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=Cuda))
    assert runner_device(types.SimpleNamespace(device="cuda")) == "cuda:NVIDIA H100 #0"
    assert runner_device(types.SimpleNamespace(device="cuda:1")) == "cuda:NVIDIA H100 #1"
    monkeypatch.delitem(sys.modules, "torch")
    assert runner_device(types.SimpleNamespace(device="cuda:1")) == "cuda:1"  # never imports torch itself


def test_brief_is_one_line_with_the_first_failures_and_how_many_more():
    seed = int(np.random.default_rng().integers(2**31))
    io = toy_io()
    result = compare(ToyRunner(seed, "ref"), ToyRunner(seed, "cand", a_scale=1.3), io, prompts=(), steps=16, long_steps=0)
    assert not result and len(result.failures) >= 1
    brief = result.brief(most=1)
    assert "\n" not in brief and brief.startswith("FAIL at fp32: ") and str(result.failures[0]) in brief
    more = len(result.failures) - 1
    assert (f"and {more} more" in brief) == (more > 0)
    same = compare(ToyRunner(seed, "ref"), ToyRunner(seed, "cand"), io, prompts=(), steps=4, long_steps=0)
    assert same.brief() == "PASS at fp32"
