"""StreamingSession over the reference runners equals NestedLM's own prefill + steps."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch

from edgeseq.deploy.bundle import BundleError
from edgeseq.export.spec import GraphIO, TensorSpec
from edgeseq.runtimes.base import FeedError, InferenceError, Runner
from edgeseq.runtimes.session import SessionError, StateError, StreamingSession
from edgeseq.runtimes.torch_runner import TorchRunner
from tests.conftest import random_model, small_config

PATTERNS = ["M M+ S+ M A", "M M+"]  # hybrid (every mixer kind), Mamba2 only
ATOL = 1e-5  # fp32; the chunked scan and the recurrence round differently


def runners(model, prefill: bool = True):
    step = TorchRunner(model, "step")
    step.activate()
    pre = TorchRunner(model, "prefill") if prefill else None
    if pre is not None:
        pre.activate()
    return step, pre


def reference(model, prompt: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
    """NestedLM's logits after the prompt, then after each token; prompt [B, T], tokens [B, K]."""
    with torch.no_grad():
        logits, state = model(torch.from_numpy(prompt), last_only=True)
        out = [logits.numpy()]
        for k in range(tokens.shape[1]):
            logits, state = model.step(torch.from_numpy(tokens[:, k]), state)
            out.append(logits.numpy())
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("use_prefill_graph", [True, False])
def test_session_matches_model(pattern, use_prefill_graph):
    config = small_config(pattern)
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    prompt = rng.integers(0, config.vocab_size, (1, int(rng.integers(3, 10))))
    tokens = rng.integers(0, config.vocab_size, (1, 4))
    session = StreamingSession(*runners(model, use_prefill_graph))
    got = [session.prefill(prompt[0].tolist())] + [session.step(int(t)) for t in tokens[0]]
    for g, want in zip(got, reference(model, prompt, tokens)):
        assert g.shape == (config.vocab_size,)
        np.testing.assert_allclose(g, want[0], atol=ATOL, rtol=0)
    assert session.position == prompt.shape[1] + tokens.shape[1]


def test_prefill_graph_with_all_logits_gives_the_last():
    config = small_config("M S+")
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    prompt = rng.integers(0, config.vocab_size, (1, 5))
    step, _ = runners(model, prefill=False)
    with TorchRunner(model, "prefill", all_logits=True) as prefill:
        got = StreamingSession(step, prefill).prefill(prompt[0])
    np.testing.assert_allclose(got, reference(model, prompt, prompt[:, :0])[0][0], atol=ATOL, rtol=0)


def test_batched_streams_match_model():
    config = small_config()
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    prompt, tokens = rng.integers(0, config.vocab_size, (2, 5)), rng.integers(0, config.vocab_size, (2, 3))
    session = StreamingSession(*runners(model), batch=2)
    got = [session.prefill(prompt)] + [session.step(tokens[:, k]) for k in range(tokens.shape[1])]
    for g, want in zip(got, reference(model, prompt, tokens)):
        np.testing.assert_allclose(g, want, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(session.position, [8, 8])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_save_load_mid_stream_continues_identically(pattern):
    config = small_config(pattern)
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    prompt, tokens = rng.integers(0, config.vocab_size, 6), rng.integers(0, config.vocab_size, 3).tolist()
    session = StreamingSession(*runners(model))
    session.prefill(prompt)
    session.step(tokens[0])
    blob = session.save_state()
    first = [session.step(t) for t in tokens[1:]]

    session.load_state(blob)
    assert session.position == 7
    again = [session.step(t) for t in tokens[1:]]
    fresh = StreamingSession(*runners(model, prefill=False))
    fresh.load_state(blob)
    resumed = [fresh.step(t) for t in tokens[1:]]
    for a, b, c in zip(first, again, resumed):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_reset_restarts_the_stream():
    config = small_config("M S+")
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    prompt = rng.integers(0, config.vocab_size, 5)
    session = StreamingSession(*runners(model))
    first = session.prefill(prompt)
    session.step(3)
    session.reset()
    assert session.position == 0
    np.testing.assert_array_equal(session.prefill(prompt), first)


def test_load_state_rejects_what_does_not_fit():
    config = small_config("M A")
    model, rng = random_model(config, torch.float32), np.random.default_rng()
    session = StreamingSession(*runners(model))
    session.prefill(rng.integers(0, config.vocab_size, 4))
    good = session.save_state()
    state = safetensors.numpy.load(good)
    before = session.step(1)
    session.load_state(good)

    with pytest.raises(StateError, match="not a saved session state"):
        session.load_state(b"\x00" * 7 + rng.bytes(40))
    with pytest.raises(StateError, match="missing"):
        session.load_state(safetensors.numpy.save({k: v for k, v in state.items() if k != "past.1.key"}))
    with pytest.raises(StateError, match="unexpected"):
        session.load_state(safetensors.numpy.save({**state, "past.9.ssm": state["past.0.ssm"]}))
    with pytest.raises(StateError, match="past.0.ssm"):
        session.load_state(safetensors.numpy.save({**state, "past.0.ssm": state["past.0.ssm"][..., :-1].copy()}))
    with pytest.raises(StateError, match="float64"):
        session.load_state(safetensors.numpy.save({**state, "past.0.conv": state["past.0.conv"].astype(np.float64)}))
    other = StreamingSession(*runners(random_model(small_config("M A", ngroups=1), torch.float32)))
    with pytest.raises(StateError):
        session.load_state(other.save_state())
    np.testing.assert_array_equal(session.step(1), before)  # a rejected load leaves the stream as it was


class StridedRunner(Runner):
    """A step graph whose present.0.ssm = past.0.ssm + ids, handed back as a strided view."""

    def __init__(self):
        super().__init__("strided")
        spec = TensorSpec("past.0.ssm", "float32", ("batch", 3))
        self._io = GraphIO(
            (TensorSpec("input_ids", "int64", ("batch", 1)), spec),
            (TensorSpec("logits", "float32", ("batch", 8)), TensorSpec("present.0.ssm", "float32", ("batch", 3))),
            (("past.0.ssm", "present.0.ssm"),),
        )

    @property
    def io(self):
        return self._io

    def _activate(self):
        pass

    def _deactivate(self):
        pass

    def _infer(self, feeds):
        x = feeds["past.0.ssm"] + feeds["input_ids"].astype(np.float32) * np.float32([1, 2, 3])  # (b, 3)
        wide = np.stack([x, -x], axis=2).reshape(len(x), 6)  # (b, 6): x0, -x0, x1, -x1, ...
        return {"logits": np.zeros((len(x), 8), np.float32), "present.0.ssm": wide[:, ::2]}  # a vocabulary of 8


def test_save_state_of_strided_outputs_round_trips():
    with StridedRunner() as runner:
        session = StreamingSession(runner)
        session.prefill([4, 5])
        blob = session.save_state()
        session.reset()
        session.load_state(blob)
        assert session.save_state() == blob
    np.testing.assert_array_equal(safetensors.numpy.load(blob)["past.0.ssm"], [[9, 18, 27]])
    assert session.position == 2


def test_bad_ids_are_rejected():
    session = StreamingSession(*runners(random_model(small_config("M"), torch.float32)))
    with pytest.raises(FeedError, match="at least one"):
        session.prefill([])
    with pytest.raises(FeedError, match="stream"):
        session.step([1, 2])


def test_session_and_ort_runner_do_not_import_torch():
    code = (
        "import sys; import edgeseq.runtimes.session, edgeseq.runtimes.ort_runner, edgeseq.runtimes.base; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorrt')); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_session_on_the_builtin_mamba2_tiny():
    from edgeseq.zoo import load_model

    model, _ = load_model("mamba2-tiny")
    rng = np.random.default_rng()
    prompt, tokens = rng.integers(0, 256, (1, 8)), rng.integers(0, 256, (1, 2))
    session = StreamingSession(*runners(model))
    got = [session.prefill(prompt[0])] + [session.step(int(t)) for t in tokens[0]]
    for g, want in zip(got, reference(model, prompt, tokens)):
        np.testing.assert_allclose(g, want[0], atol=1e-4, rtol=0)  # trained logits are O(10), not O(1)


def test_a_path_where_a_runner_belongs_points_to_from_bundle(tmp_path):
    for where in (str(tmp_path / "bundle"), tmp_path / "bundle"):
        with pytest.raises(SessionError, match=r"StreamingSession\.from_bundle\(") as err:
            StreamingSession(where)
        assert "\n" not in str(err.value) and str(tmp_path / "bundle") in str(err.value)
    step, _ = runners(random_model(small_config("M"), torch.float32), prefill=False)
    with pytest.raises(SessionError, match="not a runner"):
        StreamingSession(step, {"step": "graph.onnx"})
    with pytest.raises(SessionError, match="batch"):
        StreamingSession(step, batch=0)


def test_token_ids_outside_the_vocabulary_name_the_range():
    config = small_config("M S+")
    session = StreamingSession(*runners(random_model(config, torch.float32)))
    rng, vocab = np.random.default_rng(), config.vocab_size
    good = rng.integers(0, vocab, int(rng.integers(2, 6)))
    for bad in (int(rng.integers(vocab, vocab + 1000)), -int(rng.integers(1, 1000))):
        prompt = good.copy()
        prompt[int(rng.integers(0, len(prompt)))] = bad
        with pytest.raises(FeedError, match=rf"token id {bad} is out of range; .* ids 0 to {vocab - 1}"):
            session.prefill(prompt)
        with pytest.raises(FeedError, match=rf"ids 0 to {vocab - 1}"):
            session.step(bad)
    assert session.position == 0  # nothing ran
    with pytest.raises(FeedError, match="integers"):
        session.step(1.5)
    with pytest.raises(FeedError, match="ragged"):
        StreamingSession(*runners(random_model(config, torch.float32)), batch=2).prefill([[1, 2], [3]])
    session.prefill(good)  # the edges of the range are fine
    session.step(vocab - 1)
    session.step(0)
    assert session.position == len(good) + 2


def test_from_bundle_refuses_what_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        StreamingSession.from_bundle(tmp_path)
    with pytest.raises(SessionError, match="threads"):
        StreamingSession.from_bundle(tmp_path, threads=-1)


def test_onnxruntime_failures_are_edgeseq_errors(counter_onnx):
    """A feed that skips the checks still fails as one line, and an id the counter graph's
    vocabulary (2) lacks never reaches onnxruntime."""
    pytest.importorskip("onnxruntime")
    from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner

    with OnnxRuntimeRunner(counter_onnx, intra_op_threads=1) as runner:
        with pytest.raises(InferenceError, match="onnxruntime failed to run") as err:
            runner.infer({"input_ids": np.zeros((1, 1), np.float32), "past.0.ssm": np.zeros((1, 1), np.float32)},
                         check=False)  # fmt: skip
        assert "\n" not in str(err.value)
        with pytest.raises(FeedError, match="dict"):
            runner.infer([np.zeros((1, 1), np.int64)])
        session = StreamingSession(runner)
        assert session.vocab_size == 2
        with pytest.raises(FeedError, match="ids 0 to 1"):
            session.step(2)
        np.testing.assert_allclose(session.prefill([1, 1, 0]), [2, -2])
