"""The session's state buffers: written in place where the graph allows it, swapped with a
spare otherwise, never aliased across calls — and the stream is the same either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseq.export.graphs import build_graph, io_of
from edgeseq.export.spec import IN_PLACE_KEY
from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner
from edgeseq.runtimes.session import StreamingSession
from tests.conftest import random_model, small_config

pytest.importorskip("onnxruntime")


class Copying(OnnxRuntimeRunner):
    """The same graph, its in-place permission ignored: every present goes to a fresh buffer."""

    @property
    def in_place_state(self) -> frozenset[str]:
        return frozenset()


def session(model, runner_type, flavor: str) -> StreamingSession:
    step, prefill = (runner_type(build_graph(model, kind, flavor).SerializeToString(), io=io_of(model, kind))
                     for kind in ("step", "prefill"))  # fmt: skip
    step.activate()
    prefill.activate()
    return StreamingSession(step, prefill)


@pytest.mark.parametrize("flavor", ["contrib", "portable"])
def test_in_place_state_gives_the_same_stream(flavor):
    model = random_model(small_config("M A M+", d_model=64, vocab_size=200), dtype=torch.float32)
    proto = build_graph(model, "step", flavor)
    declared = {p.key: p.value for p in proto.metadata_props}.get(IN_PLACE_KEY, "")
    # only the contrib step's LinearAttention state is written in place
    assert declared.split(",") == (["past.0.ssm", "past.2.ssm"] if flavor == "contrib" else [""])
    fast, slow = session(model, OnnxRuntimeRunner, flavor), session(model, Copying, flavor)
    rng = np.random.default_rng()
    ids = rng.integers(0, 200, int(rng.integers(3, 9)))
    np.testing.assert_array_equal(fast.prefill(ids), slow.prefill(ids))
    snap = fast.snapshot()
    for i in range(12):
        token = int(rng.integers(0, 200))
        before = dict(fast._state)
        np.testing.assert_array_equal(fast.step(token), slow.step(token))
        if i > 0:  # after the first step the buffers are the session's own: updated where they are
            kept = {n for n in before if fast._state[n] is before[n]}
            assert kept == set(fast.step_runner.in_place_state), kept
        if i == 5:  # a prompt between steps: the prefill graph writes to spare buffers, not over its feeds
            more = rng.integers(0, 200, 4)
            np.testing.assert_array_equal(fast.prefill(more), slow.prefill(more))
    for name in fast._state:
        np.testing.assert_array_equal(fast._state[name], slow._state[name])
        assert not any(fast._state[name] is s for s in (fast._spare or {}).values())  # spares never alias the state
    # a snapshot taken before is untouched by the in-place updates, and restoring it replays the stream
    fast.restore(snap)
    slow_again = session(model, Copying, flavor)
    slow_again.prefill(ids)
    token = int(rng.integers(0, 200))
    np.testing.assert_array_equal(fast.step(token), slow_again.step(token))
