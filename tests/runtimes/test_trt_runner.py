"""TensorRTRunner: a clear error without TensorRT; the add and counter graphs with it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgeseq.errors import EdgeseqError, RuntimeUnavailableError
from edgeseq.runtimes.base import RunnerNotActiveError
from edgeseq.runtimes.trt_runner import TensorRTRunner


def test_without_tensorrt_activate_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, installed or not
    runner = TensorRTRunner(tmp_path / "model.onnx")  # constructing needs nothing
    with pytest.raises(RunnerNotActiveError):
        runner.infer({})
    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not installed") as info:
        runner.activate()
    assert isinstance(info.value, EdgeseqError) and not runner.is_active


@pytest.mark.gpu
def test_engine_from_onnx_and_from_bytes(add_onnx, tmp_path):
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    path = tmp_path / "add.onnx"
    path.write_bytes(add_onnx)
    rng = np.random.default_rng()
    a, b = (rng.standard_normal((3, 3), dtype=np.float32) for _ in range(2))
    with TensorRTRunner(path, max_batch=4) as runner:
        out = runner.infer({"a": a, "b": b})
        engine = runner.serialized_engine()
    np.testing.assert_allclose(out["c"], a + b, atol=1e-6, rtol=0)
    with TensorRTRunner(engine) as runner:
        np.testing.assert_allclose(runner.infer({"a": a[:1], "b": b[:1]})["c"], (a + b)[:1], atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_session_over_tensorrt(counter_onnx, tmp_path):
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from edgeseq.runtimes.session import StreamingSession

    path = tmp_path / "counter.onnx"
    path.write_bytes(counter_onnx)
    ids = np.random.default_rng().integers(0, 2, 6)  # the counter's vocabulary is 2; the session refuses other ids
    with TensorRTRunner(path, max_sequence=16) as runner:
        session = StreamingSession(runner, runner)
        np.testing.assert_allclose(session.prefill(ids[:5]), [ids[:5].sum(), -ids[:5].sum()], atol=1e-5, rtol=0)
        np.testing.assert_allclose(session.step(int(ids[5])), [ids.sum(), -ids.sum()], atol=1e-5, rtol=0)
