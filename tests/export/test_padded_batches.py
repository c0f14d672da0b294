"""Left-padded prompt batches: one prefill call of prompts of different lengths leaves each
stream exactly where its prompt alone would, and decode goes on from there.

Both shipped models at widths 1 and 1/2, in the torch reference (``TorchRunner``, so
``NestedLM.forward`` with a mask) and in onnxruntime (portable and opset27 graphs), all
through ``StreamingSession.prefill_batch``. A small random hybrid (a 6-token window and
4-token chunks: pads meet ring wrap-around and chunk edges) adds the tensorrt flavor (its
plugin nodes as the kernels' CPU twins) and the session without a prefill graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseq.export.graphs import build_graph
from edgeseq.export.spec import graph_io
from edgeseq.extract import extract
from edgeseq.runtimes.base import FeedError
from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner
from edgeseq.runtimes.session import StreamingSession
from edgeseq.runtimes.torch_runner import TorchRunner
from edgeseq.state import ModelState
from edgeseq.zoo import load_model
from tests.conftest import random_model, small_config

pytest.importorskip("onnxruntime")

ATOL = 1e-4  # fp32: a row of a padded batch vs its prompt alone (max abs logit)
STEPS = 24
LENGTHS = (3, 41)  # prompt lengths drawn from [3, 40]
MODELS = [(name, width) for name in ("mamba2-tiny", "hybrid-tiny") for width in ("1", "1/2")]
BACKENDS = ["torch", "portable", "opset27"]


def open_runners(model, backend: str):
    """Active (step, prefill) runners of ``model`` on ``backend``: "torch" or an export flavor."""
    if backend == "torch":
        pair = (TorchRunner(model, "step"), TorchRunner(model, "prefill"))
    else:
        plugins = "reference" if backend == "tensorrt" else None
        pair = tuple(
            OnnxRuntimeRunner(build_graph(model, kind, backend).SerializeToString(), intra_op_threads=1,
                              io=graph_io(model.config, kind), plugins=plugins)
            for kind in ("step", "prefill")
        )  # fmt: skip
    for runner in pair:
        runner.activate()
    return pair


@pytest.fixture(scope="module", params=MODELS, ids=lambda p: f"{p[0]}-w{p[1].replace('/', '_')}")
def model(request):
    name, width = request.param
    full, _ = load_model(name, dtype=torch.float32)
    return extract(full, width).eval()


@pytest.fixture(scope="module", params=BACKENDS)
def runners(request, model):
    pair = open_runners(model, request.param)
    yield pair
    for runner in pair:
        runner.deactivate()


@pytest.fixture(scope="module")
def small_runners():
    """A random hybrid with every mixer kind, a 6-token window and 4-token chunks, per flavor."""
    model = random_model(small_config(), dtype=torch.float32).eval()
    opened = {backend: open_runners(model, backend) for backend in ("torch", "portable", "opset27", "tensorrt")}
    yield opened
    for pair in opened.values():
        for runner in pair:
            runner.deactivate()


def random_prompts(rng: np.random.Generator, vocab: int, n: int = 4) -> list[np.ndarray]:
    return [rng.integers(0, vocab, int(rng.integers(*LENGTHS))) for _ in range(n)]


def greedy(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=-1)


def assert_same_choice(batched: np.ndarray, alone: np.ndarray) -> None:
    """Greedy picks agree, unless the alone logits' top two are within rounding (a tie)."""
    a, b = int(greedy(alone)), int(greedy(batched))
    assert a == b or alone[a] - alone[b] <= 2 * ATOL, f"batched picked {b}, alone {a} ({alone[a] - alone[b]:.2e} apart)"


def batch_vs_alone(step, prefill, prompts, warmup: np.ndarray | None = None, steps: int = STEPS) -> tuple[float, float]:
    """Run ``prompts`` left-padded in one batch and each alone (after the same ``warmup``
    rows, if given); returns the max abs logit error after the prompts and over the steps,
    asserting ATOL and the same tokens on the way."""
    batched = StreamingSession(step, prefill, batch=len(prompts))
    alone = [StreamingSession(step, prefill) for _ in prompts]
    if warmup is not None:
        batched.prefill(warmup)
        for s, row in zip(alone, warmup):
            s.prefill(row)
    got = batched.prefill_batch(prompts)
    want = np.stack([s.prefill(p) for s, p in zip(alone, prompts)])
    prefill_err = float(np.abs(got - want).max())
    assert prefill_err <= ATOL
    start = 0 if warmup is None else warmup.shape[1]
    assert np.array_equal(batched.position, [start + len(p) for p in prompts])
    decode_err = 0.0
    for _ in range(steps):
        for b in range(len(prompts)):
            assert_same_choice(got[b], want[b])
        tokens = greedy(want)  # both follow the alone stream, so one near-tie cannot fork them
        got = batched.step(tokens)
        want = np.stack([s.step(int(t)) for s, t in zip(alone, tokens)])
        decode_err = max(decode_err, float(np.abs(got - want).max()))
        assert decode_err <= ATOL
    for b, s in enumerate(alone):  # and every state handed on
        mine, theirs = batched.snapshot(), s.snapshot()
        for name, value in theirs.state.items():
            np.testing.assert_allclose(mine.state[name][b : b + 1], value, rtol=0, atol=ATOL, err_msg=name)
    return prefill_err, decode_err


def test_padded_prefill_and_decode_match_each_prompt_alone(model, runners, request):
    rng = np.random.default_rng()
    prompts = random_prompts(rng, model.config.vocab_size)
    prefill_err, decode_err = batch_vs_alone(*runners, prompts)
    print(f"\n{request.node.callspec.id}: lengths {[len(p) for p in prompts]}, max abs logit error batched vs alone: "
          f"prefill {prefill_err:.2e}, {STEPS} steps {decode_err:.2e}")  # fmt: skip


def test_padded_prefill_continues_a_state(model, runners):
    rng = np.random.default_rng()
    warmup = rng.integers(0, model.config.vocab_size, (4, int(rng.integers(2, 12))))
    batch_vs_alone(*runners, random_prompts(rng, model.config.vocab_size), warmup=warmup, steps=4)


def test_an_all_pad_row_leaves_its_state_bit_identical(model, runners):
    rng = np.random.default_rng()
    vocab = model.config.vocab_size
    session = StreamingSession(*runners, batch=3)
    session.prefill(rng.integers(0, vocab, (3, int(rng.integers(2, 9)))))
    before = session.snapshot()
    t = int(rng.integers(*LENGTHS))
    mask = np.ones((3, t), np.int64)
    mask[1] = 0  # stream 1: all pads
    mask[2, : int(rng.integers(1, t))] = 0  # stream 2: a shorter prompt
    session.prefill(rng.integers(0, vocab, (3, t)), mask)
    after = session.snapshot()
    assert np.array_equal(after.position, before.position + mask.sum(1))
    for name, value in before.state.items():
        assert np.array_equal(after.state[name][1], value[1]), name
        assert not np.array_equal(after.state[name][0], value[0]), name  # the others moved on


@pytest.mark.parametrize("backend", ["torch", "portable", "opset27", "tensorrt"])
def test_pads_across_ring_wrap_and_chunk_edges(small_runners, backend):
    rng = np.random.default_rng()
    warmup = rng.integers(0, 61, (4, int(rng.integers(1, 9))))
    batch_vs_alone(*small_runners[backend], random_prompts(rng, 61), warmup=warmup, steps=8)


def test_a_session_without_prefill_graph_puts_padded_streams_back(small_runners):
    step, _ = small_runners["torch"]
    rng = np.random.default_rng()
    batch_vs_alone(step, None, random_prompts(rng, 61), steps=4)


@pytest.mark.parametrize("pattern", ["M M+ S+ M A", "A|M+ M S|M+"])
def test_reference_in_fp64(pattern):
    """NestedLM.forward with a mask, fp64: each row of a padded call (over a warm state,
    one row all pads) equals its prompt alone to rounding, every state included."""
    model = random_model(small_config(pattern))  # fp64
    rng = np.random.default_rng()
    lengths = [int(rng.integers(1, 20)) for _ in range(3)] + [0]
    t = max(lengths)
    ids = torch.from_numpy(rng.integers(0, 61, (4, t)))
    mask = torch.tensor([[0] * (t - n) + [1] * n for n in lengths])
    with torch.no_grad():
        _, warm = model(torch.from_numpy(rng.integers(0, 61, (4, int(rng.integers(1, 9))))))
        logits, state = model(ids, warm.clone(), last_only=True, mask=mask)
        for b, n in enumerate(lengths):
            row = ModelState.from_tensors(warm, lambda x, b=b: x[b : b + 1].clone())
            if n:
                alone, row = model(ids[b : b + 1, t - n :], row, last_only=True)
                torch.testing.assert_close(logits[b : b + 1], alone, rtol=0, atol=1e-12)
            atol = 1e-12 if n else 0.0  # an all-pad row: untouched
            for name, value in row.to_named().items():
                torch.testing.assert_close(state.to_named()[name][b : b + 1], value, rtol=0, atol=atol, msg=name)
        assert state.to_named()["position"].tolist() == (warm.position + mask.sum(1)).tolist()


def test_session_checks_masks_and_batches(small_runners):
    session = StreamingSession(*small_runners["portable"], batch=2)
    ids = np.ones((2, 4), np.int64)
    with pytest.raises(FeedError, match="pad on the left"):
        session.prefill(ids, np.array([[1, 1, 0, 1], [1, 1, 1, 1]]))
    with pytest.raises(FeedError, match="does not fit"):
        session.prefill(ids, np.ones((2, 3), np.int64))
    with pytest.raises(FeedError, match="0 for a pad"):
        session.prefill(ids, np.full((2, 4), 2))
    with pytest.raises(FeedError, match="one prompt per stream"):
        session.prefill_batch([[1, 2]])
    with pytest.raises(FeedError, match="at least one token"):
        session.prefill_batch([[], []])
    assert np.array_equal(session.position, [0, 0])  # nothing ran
    session.prefill_batch([[], [3, 4, 5]])
    assert np.array_equal(session.position, [0, 3])
