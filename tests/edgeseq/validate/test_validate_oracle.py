"""The long stream judged against an fp64 oracle: the rule's edges, which runner leads the
tokens, and small random models run as a correct, a subtly wrong and a noisy-reference case."""

from __future__ import annotations

import copy
import io as text_io
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from edgeseq.export.spec import (
    DRIFT_FLOOR,
    DRIFT_RATIO,
    ROUNDING_RATIO,
    TOLERANCES,
    drift_limit,
    drift_within,
    graph_io,
)
from edgeseq.runtimes.torch_runner import TorchRunner
from edgeseq.validate.compare import compare, compare_each, compare_long_stream
from edgeseq.validate.report import load_report, plot_drift, print_report, write_report
from edgeseq.validate.results import DRIFT_FP64, DriftExceeded, ToleranceExceeded
from tests.conftest import random_model, small_config
from tests.edgeseq.validate.validate_toy import ToyRunner, toy_io

# Max abs logit distance from fp64 over 4096 greedy steps of the shipped models, measured
# as export.spec's comment says: (CPU reference, fp32 graph, CUDA reference,
# wrong graphs with one layer's A_log or out_proj off by 1e-3 relative, the same off by 1e-4)
MEASURED = {
    "mamba2-tiny": (8.44e-5, 9.18e-5, 2.87e-4, (6.93e-3, 8.41e-3), (7.39e-4, 8.51e-4)),
    "mamba2-tiny@0.5": (9.24e-5, 9.32e-5, 1.01e-4, (4.33e-3, 9.48e-3), (4.66e-4, 9.44e-4)),
    "hybrid-tiny": (7.53e-5, 6.07e-5, 9.49e-5, (9.98e-2, 1.51e-2), (9.98e-3, 1.56e-3)),
}

PATTERN = "M M+"  # Mamba2 only: the state update is what drifts, and it runs in milliseconds
STEPS = 128


@pytest.fixture
def seed():
    return int(np.random.default_rng().integers(2**31))


# --- the rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MEASURED)
def test_rule_passes_correct_graphs_beside_either_reference_and_fails_wrong_ones(model):
    cpu, graph, cuda, off_1e3, off_1e4 = MEASURED[model]
    assert drift_within(graph, cpu) and drift_within(graph, cuda)
    assert drift_within(cuda, cpu)  # a correct graph run on a GPU, beside a CPU reference
    for distance in off_1e3:
        assert not drift_within(distance, cpu) and not drift_within(distance, cuda)
    for distance in off_1e4:  # beside the noisiest CUDA reference these pass: see export.spec
        assert not drift_within(distance, cpu)


@pytest.mark.parametrize("reference", [0.0, DRIFT_FLOOR / DRIFT_RATIO / 10, 1e-4, 2.9e-4, 1.0])
def test_rule_edges_are_inclusive(reference):
    limit = drift_limit(reference)
    assert limit == max(DRIFT_RATIO * reference, DRIFT_FLOOR)
    assert drift_within(limit, reference) and not drift_within(limit * (1 + 1e-9), reference)


def test_rule_lets_no_nonfinite_distance_through():
    assert not drift_within(math.nan, 1e-4) and not drift_within(math.inf, 1e-4)
    for broken in (math.nan, math.inf):  # a reference that blew up earns the floor, no more
        assert drift_limit(broken) == DRIFT_FLOOR
        assert drift_within(DRIFT_FLOOR, broken) and not drift_within(2 * DRIFT_FLOOR, broken)


# --- driving three runners (numpy toys) ---------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_oracle_leads_the_tokens_and_each_side_keeps_its_own_state(precision, seed):
    oracle = ToyRunner(seed, "fp64", dtype=np.float64)
    reference, candidate = ToyRunner(seed, "ref", roll=True), ToyRunner(seed, "cand")  # ref's argmax always moved
    result = compare_long_stream(reference, candidate, toy_io(), 20, tolerance=precision, tokens=np.array([3, 1]),
                                 oracle=oracle)  # fmt: skip
    fed = [int(s["input_ids"][0, 0]) for s in oracle.seen]
    for side in (reference, candidate):
        assert [int(s["input_ids"][0, 0]) for s in side.seen] == fed
    assert fed[:2] == [3, 1]
    for i in range(1, 19):  # after the given tokens, the fp64 model's own greedy choice
        h = oracle.seen[i]["past.0.ssm"] @ oracle.A.T + oracle.E[fed[i]]
        assert fed[i + 1] == int(np.argmax(h @ oracle.C))
    assert oracle.seen[5]["past.0.ssm"].dtype == np.float64 and candidate.seen[5]["past.0.ssm"].dtype == np.float32
    assert not np.array_equal(oracle.seen[5]["past.0.ssm"], candidate.seen[5]["past.0.ssm"])  # its own, unrounded
    drift = result.oracle_drift
    assert len(drift.candidate) == len(drift.reference) == result.calls == 20
    assert result and not drift.judged and result.checks == ()  # reported, not judged, at reduced precisions
    summary = compare(reference, candidate, toy_io(), tolerance=precision, prompts=(), steps=0, long_steps=5,
                      oracle=oracle).summary()  # fmt: skip
    assert "long_stream vs fp64: candidate" in summary and "reported, not judged" in summary
    assert drift.reference_max > 1.0 and 0 < drift.candidate_max < 1e-4  # the rolled vocabulary vs fp32 rounding


def test_fp64_rule_replaces_the_drift_limit_and_names_the_first_call_past_it(seed):
    io, steps = toy_io(), 200
    good = compare_long_stream(ToyRunner(seed), ToyRunner(seed), io, steps, oracle=ToyRunner(seed, dtype=np.float64))
    assert good and good.checks == (DRIFT_FP64, "kl") and good.oracle_drift.judged
    alone = compare_long_stream(ToyRunner(seed), ToyRunner(seed), io, steps)  # no oracle: judged as before
    assert alone.checks == ("drift", "kl") and alone.oracle_drift is None and "oracle_drift" not in alone.to_dict()
    assert good.oracle_drift.candidate == good.oracle_drift.reference and good.oracle_drift.candidate_max > 0
    bad = compare_long_stream(ToyRunner(seed), ToyRunner(seed, a_scale=1.001), io, steps,
                              oracle=ToyRunner(seed, dtype=np.float64))  # fmt: skip
    (failure,) = [f for f in bad.failures if isinstance(f, DriftExceeded)]
    drift = bad.oracle_drift
    assert not any(isinstance(f, ToleranceExceeded) and f.metric == "drift" for f in bad.failures)
    assert (failure.candidate, failure.reference) == (drift.candidate_max, drift.reference_max)
    assert failure.limit == drift.limit == drift_limit(drift.reference_max)
    assert failure.call == int(np.argmax(np.array(drift.candidate) > drift.limit))
    assert "from fp64 > limit" in str(failure) and failure.to_dict()["kind"] == DRIFT_FP64
    with pytest.raises(ValueError, match="run it in fp64"):  # an fp32 model is no oracle
        compare_long_stream(ToyRunner(seed), ToyRunner(seed), io, 2, oracle=ToyRunner(seed))


# --- small random models ---------------------------------------------------------------


def fp64(model: torch.nn.Module) -> TorchRunner:
    """The oracle: the same model, run in fp64 on its own fp64 state."""
    return TorchRunner(model, dtype="float64")


def perturbed(model: torch.nn.Module, suffix: str, rel: float, seed: int) -> torch.nn.Module:
    """A copy whose first parameter named ``*suffix`` is off by ``rel`` relative noise."""
    wrong, gen = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p = next(p for name, p in wrong.named_parameters() if name.endswith(suffix))
        p.mul_(1 + rel * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return wrong


class NoisyRunner:
    """A CUDA-like fp32 reference: the wrapped runner's float state, each element
    multiplied by (1 + rel * N(0, 1)) before it is fed back."""

    def __init__(self, runner: TorchRunner, rel: float, seed: int):
        self.runner, self.rel, self.rng = runner, rel, np.random.default_rng(seed)
        self.io, self.name, self.device = runner.io, f"noisy-{runner.name}", runner.device

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.infer(feeds)
        for name, v in out.items():
            if name.startswith("present.") and v.dtype == np.float32:
                out[name] = (v * (1 + self.rel * self.rng.standard_normal(v.shape))).astype(np.float32)
        return out


def long_stream(reference, candidate, oracle, config, seed: int):
    return compare(reference, candidate, graph_io(config, "step"), prompts=(), steps=0, long_steps=STEPS, seed=seed,
                   oracle=oracle)  # fmt: skip


@pytest.mark.parametrize("pattern", [PATTERN, "M S+ A"])  # and a hybrid: positions, caches in fp64
def test_exact_candidate_passes_and_both_distances_are_reported(pattern, seed):
    config = small_config(pattern)
    model = random_model(config, torch.float32, seed=seed)
    steps = STEPS if pattern == PATTERN else 24  # attention steps are slow on a busy CPU
    with TorchRunner(model) as ref, TorchRunner(copy.deepcopy(model)) as cand, fp64(model) as oracle:
        result = compare(ref, cand, graph_io(config, "step"), prompts=(), steps=0, long_steps=steps, seed=seed,
                         oracle=oracle)  # fmt: skip
    phase = result.phases["long_stream"]
    drift = phase.oracle_drift
    assert result, result.summary()
    assert phase.outputs["logits"].max_abs == 0.0  # the same fp32 model: no candidate-vs-reference error
    assert drift.candidate == drift.reference and len(drift.candidate) == steps
    assert 0 < drift.reference_max < 1e-4  # fp32 rounding, fed back for a short stream
    assert result.oracle["name"] == "torch-step-cpu-fp64" and result.oracle["device"] == "cpu"
    assert "long_stream vs fp64: candidate" in result.summary() and "within limit" in result.summary()


def test_subtly_wrong_state_update_fails_against_fp64(seed):
    config = small_config(PATTERN)
    model = random_model(config, torch.float32, seed=seed)
    wrong = perturbed(model, "A_log", 1e-2, seed)  # one layer's decay rates off by ~1%: a wrong state update
    with TorchRunner(model) as ref, TorchRunner(wrong) as cand, fp64(model) as oracle:
        judged = long_stream(ref, cand, oracle, config, seed)
        old = compare(ref, cand, graph_io(config, "step"), prompts=(), steps=0, long_steps=STEPS, seed=seed)
    drift = judged.phases["long_stream"].oracle_drift
    assert not judged and any(isinstance(f, DriftExceeded) for f in judged.failures)
    assert {f.metric for f in judged.failures if isinstance(f, ToleranceExceeded)} <= {"kl"}  # drift is fp64's now
    assert drift.reference_max < 1e-5 < DRIFT_FLOOR < drift.candidate_max  # the reference is near-exact here
    assert not old  # fp32 against fp32 saw it too, on a reference this accurate
    assert "past limit" in judged.summary()


def test_noisy_reference_no_longer_fails_a_correct_candidate_and_still_fails_a_wrong_one(seed):
    config = small_config(PATTERN)
    model = random_model(config, torch.float32, seed=seed)
    io = graph_io(config, "step")
    with TorchRunner(model) as ref, TorchRunner(copy.deepcopy(model)) as cand, fp64(model) as oracle:
        noisy = NoisyRunner(ref, 1e-4, seed)
        old = compare(noisy, cand, io, prompts=(), steps=0, long_steps=STEPS, seed=seed)
        new = long_stream(noisy, cand, oracle, config, seed)
        with TorchRunner(perturbed(model, "A_log", 0.3, seed)) as wrong:
            still_wrong = long_stream(NoisyRunner(ref, 1e-4, seed), wrong, oracle, config, seed)
    assert ("long_stream", "drift") in {(f.phase, f.metric) for f in old.failures if isinstance(f, ToleranceExceeded)}
    drift = new.phases["long_stream"].oracle_drift
    assert new, new.summary()
    assert drift.reference_max > 1e-4 > drift.candidate_max  # the noise is the reference's, not the candidate's
    assert drift.ratio < 1
    assert not still_wrong and any(isinstance(f, DriftExceeded) for f in still_wrong.failures)


# --- the report -------------------------------------------------------------------------


def test_report_shows_both_distances_the_rule_and_the_verdict(tmp_path, seed):
    result = compare(ToyRunner(seed, "ref"), ToyRunner(seed, "cand", a_scale=1.001), toy_io(), prompts=(), steps=0,
                     long_steps=150, seed=seed, oracle=ToyRunner(seed, "fp64", dtype=np.float64))  # fmt: skip
    report = load_report(write_report(result, tmp_path / "r.json"))
    body = report["phases"]["long_stream"]["oracle_drift"]
    assert len(body["candidate"]) == len(body["reference"]) == 150
    assert body["candidate_max"] == max(body["candidate"]) and body["reference_max"] == max(body["reference"])
    assert body["ratio"] == pytest.approx(body["candidate_max"] / body["reference_max"])
    assert body["rule"]["ratio"] == DRIFT_RATIO and body["rule"]["floor"] == DRIFT_FLOOR
    assert body["limit"] == drift_limit(body["reference_max"])
    assert (body["judged"], body["within"], body["passed"]) == (True, False, False)
    assert report["runners"]["oracle"]["name"] == "fp64"
    assert report["phases"]["long_stream"]["checks"] == [DRIFT_FP64, "kl"]
    out = text_io.StringIO()
    print_report(report, Console(file=out, width=250, color_system=None))
    text = out.getvalue()
    assert "vs fp64 (fp64, cpu): candidate" in text and "fp32 reference" in text and ": past" in text
    png = plot_drift(report, tmp_path / "drift.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


# --- limits no tighter than the reference's own rounding --------------------------------


@pytest.mark.parametrize("distance", [0.0, 1e-6, 1e-4, 3e-3, math.inf, math.nan])
def test_rounding_raises_limits_to_its_ratio_and_never_lowers_one(distance):
    base = TOLERANCES["fp32"]
    raised = base.beside_rounding(distance, distance / 10)
    for field, d in (("max_abs_logit", distance), ("prefill_logit", distance), ("handoff_logit", distance),
                     ("prefill_state", distance / 10), ("handoff_state", distance / 10)):  # fmt: skip
        want = getattr(base, field) if not math.isfinite(d) else max(getattr(base, field), ROUNDING_RATIO * d)
        assert getattr(raised, field) == want
    assert raised.kl == base.kl and raised.top1_agreement == base.top1_agreement and raised.drift == base.drift
    assert TOLERANCES["fp16"].beside_rounding(1e-3, 1e-3).max_abs_logit is None  # not judged stays not judged


class LoudLogits:
    """An fp32 reference whose logits carry N(0, sigma) noise (its state is exact): a
    reference further from fp64 than the absolute fp32 limits, as at 130M weights."""

    def __init__(self, runner: TorchRunner, sigma: float, seed: int):
        self.runner, self.sigma, self.rng = runner, sigma, np.random.default_rng(seed)
        self.io, self.name, self.device = runner.io, f"loud-{runner.name}", runner.device

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.infer(feeds)
        out["logits"] = (out["logits"] + self.sigma * self.rng.standard_normal(out["logits"].shape)).astype(np.float32)
        return out


def test_a_reference_far_from_fp64_raises_prefill_and_decode_limits_and_a_wrong_graph_still_fails(seed):
    config = small_config(PATTERN)
    model = random_model(config, torch.float32, seed=seed)
    io, pre_io = graph_io(config, "step"), graph_io(config, "prefill")
    prompts = [np.random.default_rng(seed).integers(0, config.vocab_size, (1, n)) for n in (5, 33)]
    wrong_model = perturbed(model, "out_proj.weight", 0.05, seed)
    with TorchRunner(model) as step, TorchRunner(model, "prefill") as pre, \
            TorchRunner(copy.deepcopy(model)) as cand, TorchRunner(copy.deepcopy(model), "prefill") as cand_pre, \
            TorchRunner(wrong_model) as wrong, TorchRunner(wrong_model, "prefill") as wrong_pre, \
            TorchRunner(model, "prefill", dtype="float64", all_logits=True) as oracle:  # fmt: skip
        ref, ref_pre = LoudLogits(step, 3e-4, seed), LoudLogits(pre, 3e-4, seed + 1)
        kwargs = {"prompts": prompts, "steps": 24, "long_steps": 0, "seed": seed}
        plain = compare_each(ref, [cand], io, prefill=(ref_pre, [cand_pre], pre_io), **kwargs)[0]
        fair, caught = compare_each(ref, [cand, wrong], io, prefill=(ref_pre, [cand_pre, wrong_pre], pre_io),
                                    oracle=oracle, **kwargs)  # fmt: skip
    over = {(f.phase, f.metric) for f in plain.failures if isinstance(f, ToleranceExceeded)}
    assert {("prefill", "prefill_logit"), ("decode", "max_abs_logit")} <= over  # 1e-4 absolute: the noise fails it
    assert fair, fair.summary()  # the reference's own distance from fp64 raised the limits
    assert fair.phases["decode"].oracle_drift.reference_max > 1e-4
    wrong_over = {(f.phase, f.metric) for f in caught.failures if isinstance(f, ToleranceExceeded)}
    assert {("prefill", "prefill_logit"), ("decode", "max_abs_logit")} <= wrong_over
