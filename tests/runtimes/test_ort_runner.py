"""OnnxRuntimeRunner mechanics on hand-made graphs (no exporter involved)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgeseq.export.spec import GraphIO, TensorSpec
from edgeseq.runtimes.base import FeedError, GraphIOError, RunnerNotActiveError
from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner
from edgeseq.runtimes.session import StreamingSession


def test_life_cycle_on_an_add_graph(add_onnx, tmp_path):
    rng = np.random.default_rng()
    batch = int(rng.integers(1, 5))
    a, b = (rng.standard_normal((batch, 3), dtype=np.float32) for _ in range(2))
    path = tmp_path / "add.onnx"
    path.write_bytes(add_onnx)
    for source in (add_onnx, path, str(path)):
        runner = OnnxRuntimeRunner(source, intra_op_threads=1)
        assert not runner.is_active and runner.providers_used == []
        with pytest.raises(RunnerNotActiveError):
            runner.infer({"a": a, "b": b})
        with pytest.raises(RunnerNotActiveError, match="activate"):
            _ = runner.io  # read from the session, so only once active
        with runner as active:
            assert active is runner and runner.is_active
            assert runner.providers_used == ["CPUExecutionProvider"]
            assert [t.name for t in runner.io.inputs] == ["a", "b"] and runner.io.outputs[0].shape == ("batch", 3)
            out = runner.infer({"a": a, "b": b})
            assert list(out) == ["c"] and runner.last_inference_time() > 0
            np.testing.assert_allclose(out["c"], a + b, atol=1e-7, rtol=0)
        assert not runner.is_active
        with pytest.raises(RunnerNotActiveError):
            runner.infer({"a": a, "b": b})


def test_feeds_are_checked_before_onnxruntime_sees_them(add_onnx):
    a = np.random.default_rng().standard_normal((2, 3), dtype=np.float32)
    with OnnxRuntimeRunner(add_onnx) as runner:
        with pytest.raises(FeedError, match="missing \\['b'\\]"):
            runner.infer({"a": a})
        with pytest.raises(FeedError, match="float64"):
            runner.infer({"a": a, "b": a.astype(np.float64)})
        with pytest.raises(FeedError, match="shape"):
            runner.infer({"a": a, "b": a[:, :2].copy()})
        with pytest.raises(FeedError, match="batch"):
            runner.infer({"a": a, "b": a[:1].copy()})


def test_declared_io_is_checked_against_the_graph(add_onnx):
    spec = TensorSpec("a", "float32", ("batch", 3))
    good = GraphIO((spec, TensorSpec("b", "float32", ("batch", 3))), (TensorSpec("c", "float32", ("batch", 3)),), ())
    with OnnxRuntimeRunner(add_onnx, io=good) as runner:
        assert runner.io is good
    bad = GraphIO((spec, TensorSpec("b", "int64", ("batch", 3))), good.outputs, ())
    with pytest.raises(GraphIOError, match="inputs"):
        OnnxRuntimeRunner(add_onnx, io=bad).activate()


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own warning; ours is logged
def test_unavailable_provider_falls_back_and_is_reported(add_onnx, caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback cannot be seen")
    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with OnnxRuntimeRunner(add_onnx, providers=asked) as runner:
        assert runner.providers_requested == asked
        assert runner.providers_used == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in caplog.text


def test_session_over_onnxruntime_feeds_present_back_into_past(counter_onnx):
    ids = np.random.default_rng().integers(0, 2, 7)  # the counter's vocabulary is 2; the session refuses other ids
    with OnnxRuntimeRunner(counter_onnx) as step, OnnxRuntimeRunner(counter_onnx) as prefill:
        assert step.io.state_pairs == (("past.0.ssm", "present.0.ssm"),)
        looped = StreamingSession(step)
        once = StreamingSession(step, prefill)
        for session in (looped, once):
            np.testing.assert_allclose(session.prefill(ids[:5]), [ids[:5].sum(), -ids[:5].sum()], atol=1e-6, rtol=0)
            np.testing.assert_allclose(session.step(int(ids[5])), [ids[:6].sum(), -ids[:6].sum()], atol=1e-6, rtol=0)
            assert session.position == 6
