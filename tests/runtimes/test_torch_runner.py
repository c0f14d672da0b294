"""TorchRunner speaks the graphs' I/O and computes exactly what NestedLM computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseq.export.spec import graph_io, token_feeds
from edgeseq.runtimes.base import FeedError, RunnerNotActiveError
from edgeseq.runtimes.torch_runner import TorchRunner
from edgeseq.state import ModelState
from tests.conftest import random_model, small_config

PATTERNS = ["M M+ S+ M A", "M M+"]  # hybrid (every mixer kind), Mamba2 only
ATOL = 1e-6  # same model, same fp32 ops: only the path through numpy differs


def random_feeds(config, kind: str, batch: int, tokens: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh feeds for the graph of ``kind``: random ids, state and position."""
    io = graph_io(config, kind)
    feeds = token_feeds(io, rng.integers(0, config.vocab_size, (batch, tokens), dtype=np.int64))
    for spec in io.inputs:
        shape = tuple(batch if isinstance(d, str) else d for d in spec.shape)
        if spec.name in feeds:
            continue
        if spec.name == "position":
            feeds[spec.name] = rng.integers(0, 20, shape, dtype=np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32) * 0.5
    return feeds


def state_of(config, feeds: dict[str, np.ndarray]) -> ModelState:
    named = {k.removeprefix("past."): torch.from_numpy(v.copy()) for k, v in feeds.items() if k.startswith("past.")}
    named["position"] = torch.from_numpy(feeds["position"].copy()) if "position" in feeds else torch.zeros(len(feeds["input_ids"]), dtype=torch.int64)
    return ModelState.from_named(config, named)


def check_outputs(runner, out, logits, state) -> None:
    assert list(out) == [t.name for t in runner.io.outputs]
    np.testing.assert_allclose(out["logits"], logits.numpy(), atol=ATOL, rtol=0)
    for name, want in state.to_named().items():
        if f"present.{name}" in out:
            np.testing.assert_allclose(out[f"present.{name}"], want.numpy(), atol=ATOL, rtol=0)
    for spec in runner.io.outputs:
        assert out[spec.name].dtype == np.dtype(spec.dtype), spec.name


@pytest.mark.parametrize("pattern", PATTERNS)
def test_step_matches_model(pattern):
    config = small_config(pattern)
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    feeds = random_feeds(config, "step", batch=2, tokens=1, rng=rng)
    before = {k: v.copy() for k, v in feeds.items()}
    with TorchRunner(model, "step") as runner:
        out = runner.infer(feeds)
    with torch.no_grad():
        logits, state = model.step(torch.from_numpy(feeds["input_ids"]), state_of(config, feeds))
    check_outputs(runner, out, logits, state)
    assert ("present.position" in out) == (pattern != "M M+")
    for k in feeds:  # the runner must not write into the caller's arrays
        np.testing.assert_array_equal(feeds[k], before[k])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("all_logits", [False, True])
def test_prefill_matches_model(pattern, all_logits):
    config = small_config(pattern)
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    feeds = random_feeds(config, "prefill", batch=2, tokens=int(rng.integers(2, 9)), rng=rng)
    with TorchRunner(model, "prefill", all_logits=all_logits) as runner:
        out = runner.infer(feeds)
    with torch.no_grad():
        logits, state = model(torch.from_numpy(feeds["input_ids"]), state_of(config, feeds), last_only=not all_logits)
    check_outputs(runner, out, logits, state)
    assert out["logits"].shape == ((2, feeds["input_ids"].shape[1], 61) if all_logits else (2, 61))


def test_runs_an_fp64_model_in_fp32_without_touching_it():
    config = small_config("M S+")
    model, rng = random_model(config, torch.float64), np.random.default_rng()
    feeds = random_feeds(config, "step", batch=1, tokens=1, rng=rng)
    with TorchRunner(model, "step") as runner:
        out = runner.infer(feeds)
    assert model.embedding.weight.dtype == torch.float64
    assert out["logits"].dtype == np.float32
    with torch.no_grad():
        state = ModelState.from_tensors(state_of(config, feeds), lambda t: t if t.dtype == torch.int64 else t.double())
        logits, _ = model.step(torch.from_numpy(feeds["input_ids"]), state)
    np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4, rtol=0)  # fp32 vs fp64 rounding


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fp64_oracle_keeps_its_own_float64_state(pattern):
    config = small_config(pattern)
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    feeds = random_feeds(config, "step", batch=2, tokens=1, rng=rng)
    feeds64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    with TorchRunner(model, "step", dtype="float64") as oracle:
        out = oracle.infer(feeds64)
        with pytest.raises(FeedError, match="float32; the graph wants float64"):
            oracle.infer(feeds)  # a float32 state would round the oracle's
    assert oracle.name == "torch-step-cpu-fp64" and model.embedding.weight.dtype == torch.float32  # a copy ran
    fp32 = graph_io(config, "step")
    names_shapes = lambda io: [(t.name, t.shape) for t in io.inputs + io.outputs]
    assert names_shapes(oracle.io) == names_shapes(fp32)
    for spec in oracle.io.inputs + oracle.io.outputs:  # floats promoted, ids and positions as the graph's
        assert spec.dtype == ("int64" if spec.name in ("input_ids", "position", "present.position") else "float64")
        assert spec.name not in out or out[spec.name].dtype == np.dtype(spec.dtype)
    double = model.double()  # in place: the runner's copy is already made
    with torch.no_grad():
        logits, state = double.step(torch.from_numpy(feeds64["input_ids"]), state_of(config, feeds64))
    np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-12, rtol=0)  # the same fp64 ops
    with pytest.raises(ValueError, match="float32 or float64"):
        TorchRunner(model, dtype="float16")


def test_life_cycle_and_feed_errors():
    config = small_config("M A")
    runner, rng = TorchRunner(random_model(config, torch.float32), "step"), np.random.default_rng()
    feeds = random_feeds(config, "step", batch=1, tokens=1, rng=rng)
    with pytest.raises(RunnerNotActiveError):
        runner.infer(feeds)
    with runner:
        assert runner.is_active
        with pytest.raises(FeedError, match="missing.*position"):
            runner.infer({k: v for k, v in feeds.items() if k != "position"})
        with pytest.raises(FeedError, match="float64"):
            runner.infer({**feeds, "past.0.ssm": feeds["past.0.ssm"].astype(np.float64)})
        with pytest.raises(FeedError, match="shape"):
            runner.infer({**feeds, "past.0.ssm": feeds["past.0.ssm"][..., :-1]})
        with pytest.raises(FeedError, match="batch"):
            runner.infer({**feeds, "position": np.zeros(2, np.int64)})
    assert not runner.is_active
    with pytest.raises(RunnerNotActiveError):
        runner.infer(feeds)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    config = small_config()
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    feeds = random_feeds(config, "prefill", batch=2, tokens=5, rng=rng)
    with TorchRunner(model, "prefill") as cpu, TorchRunner(model, "prefill", device="cuda") as cuda:
        want, got = cpu.infer(feeds), cuda.infer(feeds)
    assert model.embedding.weight.device.type == "cpu"
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0, err_msg=name)  # CUDA kernels sum in another order
