"""Validation made cheaper without judging less: the fp64 oracle a chunk per call, several
candidates in lockstep beside one reference, the handoff holding one state. Each is checked
against the step-by-step, one-candidate path it replaces, on the same toy graphs."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseq.export.spec import BATCH, SEQ, TOLERANCES, GraphIO, TensorSpec
from edgeseq.validate.compare import compare, compare_each, compare_long_stream
from edgeseq.validate.results import Comparison, DriftExceeded, MissingOutput, ToleranceExceeded
from edgeseq.validate.streams import last_call, run_stream, run_verified_stream, takes_chunks
from tests.edgeseq.validate.validate_toy import ToyRunner, V, toy_io


@pytest.fixture
def seed():
    seed = int(np.random.default_rng().integers(2**31))
    print(f"seed {seed}")
    return seed


class ChunkOracle:
    """A toy taking a chunk of tokens per call and returning every position's logits, as
    ``TorchRunner(model, "prefill", all_logits=True)`` does."""

    def __init__(self, toy: ToyRunner):
        self.toy = toy
        step = toy_io()
        ids = TensorSpec("input_ids", "int64", (BATCH, SEQ))
        logits = TensorSpec("logits", "float64", (BATCH, SEQ, V))
        as64 = lambda specs: tuple(TensorSpec(t.name, "float64", t.shape) if t.dtype == "float32" else t for t in specs)
        self.io = GraphIO((ids, *as64(step.inputs[1:])), (logits, *as64(step.outputs[1:])), step.state_pairs)

    def infer(self, feeds):
        state = {k: v for k, v in feeds.items() if k != "input_ids"}
        logits = []
        for t in range(feeds["input_ids"].shape[1]):
            out = self.toy.infer({"input_ids": feeds["input_ids"][:, t : t + 1], **state})
            logits.append(out["logits"])
            state = {"past.0.ssm": out["present.0.ssm"], "position": out["present.position"]}
        return {**{f"present.{k.removeprefix('past.')}": v for k, v in state.items() if k != "position"},
                "present.position": state["position"], "logits": np.stack(logits, axis=1)}  # fmt: skip


class WrongAt:
    """A runner whose ``output`` is off by ``delta`` at call ``call`` only: the bug a
    validation must find, and find at that call."""

    def __init__(self, runner, call: int, output: str = "logits", delta: float = 1.0):
        self.runner, self.call, self.output, self.delta, self.calls = runner, call, output, delta, 0

    def infer(self, feeds):
        out = dict(self.runner.infer(feeds))
        if self.calls == self.call:
            out[self.output] = out[self.output] + np.asarray(self.delta, out[self.output].dtype)
        self.calls += 1
        return out


def _phase_dict(result, phase):
    body = result.phases[phase].to_dict()
    return {k: v for k, v in body.items() if k != "series"} | {"series": body["series"]}


@pytest.mark.parametrize("leads", ["agrees", "disagrees"])
def test_chunked_oracle_gives_the_stream_a_step_oracle_gives(seed, leads):
    """The same tokens, every call compared once, the same distances from fp64: also where
    the reference's draft is always wrong (a rolled oracle) and every chunk is taken back."""
    rng = np.random.default_rng(seed)
    steps, chunk = int(rng.integers(20, 60)), int(rng.integers(2, 9))
    tokens = rng.integers(0, V, (1, int(rng.integers(1, 6))))
    roll = leads == "disagrees"
    stepped, chunked = (Comparison("long_stream", ["logits", "present.0.ssm", "present.position"]) for _ in range(2))
    run_stream(ToyRunner(seed), ToyRunner(seed, a_scale=1.0001), toy_io(), steps, stepped, tokens=tokens,
               oracle=ToyRunner(seed, dtype=np.float64, roll=roll))  # fmt: skip
    oracle = ChunkOracle(ToyRunner(seed, dtype=np.float64, roll=roll))
    assert takes_chunks(oracle) and not takes_chunks(ToyRunner(seed))
    run_verified_stream(ToyRunner(seed), [ToyRunner(seed, a_scale=1.0001)], toy_io(), steps, [chunked],
                        tokens=tokens, oracle=oracle, chunk=chunk)  # fmt: skip
    a, b = stepped.result(TOLERANCES["fp32"]), chunked.result(TOLERANCES["fp32"])
    assert a.calls == b.calls == steps
    assert a.to_dict() == b.to_dict()
    assert a.oracle_drift.candidate == b.oracle_drift.candidate and len(b.oracle_drift.reference) == steps


def test_a_wrong_output_is_found_at_its_call_beside_a_good_candidate(seed):
    """In lockstep with a good candidate, a candidate wrong at one call fails exactly as it
    fails alone (same failures, at that call); the good one passes as it does alone."""
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(10, 40))
    call = int(rng.integers(0, steps))
    output = str(rng.choice(["logits", "present.0.ssm"]))
    kw = {"prompts": (), "steps": steps, "long_steps": 0, "tokens": np.array([[3, 1]]), "state_rel_l2": 1e-3}
    alone = compare(ToyRunner(seed), WrongAt(ToyRunner(seed), call, output), toy_io(), **kw)
    good, bad = compare_each(ToyRunner(seed), [ToyRunner(seed), WrongAt(ToyRunner(seed), call, output)], toy_io(),
                             **kw)  # fmt: skip
    assert good and not bad and not alone
    assert [str(f) for f in bad.failures] == [str(f) for f in alone.failures]
    if output == "logits":
        first = [f for f in bad.failures if isinstance(f, ToleranceExceeded) and f.metric == "max_abs_logit"]
        assert first and first[0].call == call


def test_a_drift_is_found_at_its_call_on_the_chunked_long_stream(seed):
    """The long stream judged against a chunked fp64 oracle finds a candidate that leaves
    fp64 at one call, where the step-oracle stream finds it, beside a good candidate."""
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(70, 150))  # more than one chunk
    call = int(rng.integers(0, steps))
    kw = {"prompts": (), "steps": 0, "long_steps": steps, "tokens": np.array([[2]])}
    alone = compare(ToyRunner(seed), WrongAt(ToyRunner(seed), call, delta=0.5), toy_io(),
                    oracle=ToyRunner(seed, dtype=np.float64), **kw)  # fmt: skip
    good, bad = compare_each(ToyRunner(seed), [ToyRunner(seed), WrongAt(ToyRunner(seed), call, delta=0.5)], toy_io(),
                             oracle=ChunkOracle(ToyRunner(seed, dtype=np.float64)), **kw)  # fmt: skip
    assert good and not bad and not alone
    drift = [f for f in bad.failures if isinstance(f, DriftExceeded)]
    assert drift and drift[0].call == call
    assert _phase_dict(bad, "long_stream") == _phase_dict(alone, "long_stream")


def test_a_candidate_that_cannot_be_compared_leaves_and_the_others_go_on(seed):
    steps = int(np.random.default_rng(seed).integers(5, 30))
    good, broken = compare_each(ToyRunner(seed), [ToyRunner(seed), ToyRunner(seed, drop="present.0.ssm")], toy_io(),
                                prompts=(), steps=steps, long_steps=steps,
                                oracle=ChunkOracle(ToyRunner(seed, dtype=np.float64)))  # fmt: skip
    assert good and good.phases["long_stream"].calls == good.phases["decode"].calls == steps
    assert not broken and broken.phases["decode"].calls == broken.phases["long_stream"].calls == 1
    assert any(isinstance(f, MissingOutput) for f in broken.failures)


def test_handoff_keeps_only_the_last_step(seed):
    """``last_call`` is the last record of the stream ``run_stream`` drives."""
    tokens = np.random.default_rng(seed).integers(0, V, (2, 9))
    calls = []
    run_stream(ToyRunner(seed), None, toy_io(), tokens.shape[1], tokens=tokens, record=calls)
    last = last_call(ToyRunner(seed), toy_io(), tokens)
    assert last.keys() == calls[-1][1].keys()
    assert all(np.array_equal(last[k], calls[-1][1][k]) for k in last)


def test_long_stream_api_takes_either_oracle(seed):
    oracle = ToyRunner(seed, dtype=np.float64)
    stepped = compare_long_stream(ToyRunner(seed), ToyRunner(seed), toy_io(), 30, oracle=oracle)
    chunked = compare_long_stream(ToyRunner(seed), ToyRunner(seed), toy_io(), 30,
                                  oracle=ChunkOracle(ToyRunner(seed, dtype=np.float64)))  # fmt: skip
    assert stepped and chunked and stepped.to_dict() == chunked.to_dict()
