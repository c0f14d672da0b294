"""Elastic bundles end to end on a small random hybrid (grouped B/C, GQA, windowed and
global attention, MLPs): export, every width against its own single-width bundle,
switching mid-stream both ways with both widen policies, ``edgeseq validate`` and
``edgeseq run --elastic --latency-budget-ms`` under a fake clock."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeseq.cli import main
from edgeseq.deploy.bundle import bundle_widths, read_manifest, width_view
from edgeseq.families import save_checkpoint
from edgeseq.runtimes.session import SessionError, StreamingSession
from edgeseq.switch import narrow, state_moves, widen
from edgeseq.tokenizer import ByteTokenizer
from edgeseq.width import LayerWidth
from tests.conftest import random_model, small_config

pytest.importorskip("onnxruntime")

WIDTHS = ["1", "0.5", "0.25"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The elastic bundle of widths 1, 1/2, 1/4 and, per width, its own bundle."""
    root = tmp_path_factory.mktemp("elastic")
    save_checkpoint(random_model(small_config(vocab_size=264), dtype=torch.float32), root / "model")
    common = ["--model", str(root / "model"), "--target", "x86", "--json"]
    result = CliRunner().invoke(main, ["export", *common, "--elastic", "--widths-set", "1,1/2,1/4", "-o",
                                       str(root / "elastic"), "--steps", "16", "--long-steps", "48"])  # fmt: skip
    assert result.exit_code == 0, result.output
    for w in WIDTHS:
        result = CliRunner().invoke(main, ["export", *common, "--width", w, "--no-validate", "-o", str(root / w)])
        assert result.exit_code == 0, result.output
    return root


def test_one_store_for_every_width(bundles):
    manifest = read_manifest(bundles / "elastic")
    assert bundle_widths(manifest) == WIDTHS
    widest = read_manifest(bundles / "1")
    size = manifest["weights_bytes"]
    assert size <= 1.1 * widest["weights_bytes"], (size, widest["weights_bytes"])
    assert sum(read_manifest(bundles / w)["weights_bytes"] for w in WIDTHS) > 1.5 * size  # apart they would not fit
    store = manifest["elastic"]["store"]
    assert store["restored"] > 0 and store["prefixes"] > 0
    for w in WIDTHS[1:]:  # every narrower width validated on its own, reports beside the widest's
        entry = manifest["elastic"]["members"][w]
        assert all(v["passed"] for v in entry["validation"].values()) and set(entry["validation"]) == {"contrib", "portable"}
        assert f"validation/contrib.w{w}.json" in manifest["files"]
    switching = manifest["validation"]["switching"]
    assert switching.keys() == {"contrib", "portable"} and all(s["passed"] for s in switching.values())
    policies = {(leg["policy"], leg["width"]) for leg in switching["contrib"]["legs"]}
    assert ("replay", "1") in policies and ("zeros", "1") in policies and ("zeros", "0.25") in policies


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["step", "prefill"])
def test_each_width_computes_what_its_own_bundle_does(bundles, width, kind):
    import onnxruntime as ort

    elastic, own = read_manifest(bundles / "elastic"), read_manifest(bundles / width)
    graph = width_view(elastic, width)["graphs"]["contrib"][kind]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    a = ort.InferenceSession(str(bundles / "elastic" / graph), options)
    b = ort.InferenceSession(str(bundles / width / own["graphs"]["contrib"][kind]), options)
    rng = np.random.default_rng()
    t = 1 if kind == "step" else int(rng.integers(2, 9))
    feeds = {}
    for spec in a.get_inputs():
        shape = [2 if isinstance(d, str) or d is None else d for d in spec.shape]
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 264, (2, t))
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((2, t), np.int64)
        elif spec.name == "position":
            feeds[spec.name] = rng.integers(0, 20, 2)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    for x, y, name in zip(a.run(None, feeds), b.run(None, feeds), [o.name for o in a.get_outputs()]):
        assert np.abs(x - y).max() <= 1e-5, name


def test_switching_both_ways(bundles):
    """Narrowing keeps the kept entries of the state and then runs the narrow graphs; widening
    with zeros puts them back into a zero state; widening with replay goes back to a saved
    state and re-prefills what came since, at most 2 * replay tokens."""
    rng = np.random.default_rng()
    with StreamingSession.from_bundle(bundles / "elastic") as session, \
            StreamingSession.from_bundle(bundles / "elastic", widths=["0.25"]) as narrow_only:  # fmt: skip
        manifest = read_manifest(bundles / "elastic")
        assert session.widths.labels == WIDTHS and session.width == "1" and narrow_only.widths is None
        layers = {w: tuple(map(LayerWidth.of, width_view(manifest, w)["layer_widths"])) for w in WIDTHS}
        session.widths.replay = 8
        session.prefill(rng.integers(0, 264, 11))
        for token in rng.integers(0, 264, 5):
            session.step(int(token))
        before = session.snapshot()
        assert session.set_width("1/4") is None and session.width == "0.25"  # by value or label
        moved = narrow(before.state, state_moves(session.widths.config, layers["1"], layers["0.25"]))
        assert all(np.array_equal(session.snapshot().state[k], v) for k, v in moved.items())
        narrow_only.restore(session.snapshot())  # the narrow width's own graphs from that state: the same logits
        token = int(rng.integers(0, 264))
        np.testing.assert_array_equal(session.step(token), narrow_only.step(token))
        kept = session.snapshot()
        session.set_width("0.5", widen="zeros")
        moves = state_moves(session.widths.config, layers["0.5"], layers["0.25"])
        wide = session.snapshot().state
        assert all(np.array_equal(narrow(wide, moves)[k], v) for k, v in kept.state.items())  # kept entries unchanged
        axis, index = moves["past.0.ssm"]
        assert not np.delete(wide["past.0.ssm"], index, axis=axis).any()  # the new heads start at zero
        for token in rng.integers(0, 264, 20):
            session.step(int(token))
        saved_state = dict(session.widths._saved[0].state)
        tokens = [t for s in session.widths._saved for t in s.tokens]
        assert 8 <= len(tokens) < 16  # bounded: at least replay, under 2 * replay tokens
        position = session.position
        logits = session.set_width("1", widen="replay")
        assert session.position == position and session.width == "1"
        with StreamingSession.from_bundle(bundles / "elastic", widths=["1"]) as widest:  # by hand: widen, re-prefill
            moves = state_moves(session.widths.config, layers["1"], layers["0.5"])
            shapes = {k: v.shape for k, v in session.snapshot().state.items()}
            widest._state = widen(saved_state, moves, shapes)
            np.testing.assert_allclose(logits, widest.prefill(tokens), atol=1e-6)
        with pytest.raises(SessionError, match="one width"):
            narrow_only.set_width("1")
        with pytest.raises(Exception, match="not in this bundle"):
            session.set_width("0.75")


def test_validate_checks_every_width_and_a_switching_stream(bundles):
    result = CliRunner().invoke(main, ["validate", str(bundles / "elastic"), "--flavor", "portable", "--steps", "8",
                                       "--long-steps", "16", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert {"portable", "portable@0.5", "portable@0.25", "portable switching"} <= set(outcome["flavors"])
    assert outcome["passed"]


def test_run_follows_a_latency_budget_that_tightens(bundles, monkeypatch):
    """A fake clock: a step costs 4 ms at width 1, 2 at 1/2, 1 at 1/4. A 5 ms budget keeps
    width 1; tightened to 1.5 ms at token 30, the stream narrows to 1/4 within a few steps
    per width and stays there."""
    from edgeseq.deploy import run

    cost = {"1": 4.0, "0.5": 2.0, "0.25": 1.0}
    now = [0.0]
    step = StreamingSession.step

    def timed_step(self, token):
        now[0] += cost[self.width] / 1e3
        return step(self, token)

    monkeypatch.setattr(run, "clock", lambda: now[0])
    monkeypatch.setattr(StreamingSession, "step", timed_step)
    sample, eos = run.sample, np.isin(np.arange(264), list(ByteTokenizer.eos_ids))
    # a random model may pick EOS greedily: never here, so the stream runs its 80 tokens
    monkeypatch.setattr(run, "sample", lambda logits, *a: sample(np.where(eos, -np.inf, logits), *a))
    result = CliRunner().invoke(main, ["run", str(bundles / "elastic"), "--elastic", "--latency-budget-ms", "5,1.5@30",
                                       "-n", "80", "--temperature", "0", "--prompt", "ab", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    switches = stats["switches"]
    assert [s["to"] for s in switches] == ["0.5", "0.25"], switches
    assert 30 <= switches[0]["token"] <= 32 and switches[0]["token"] < switches[1]["token"] <= switches[0]["token"] + 10
    assert stats["width"] == "0.25" and stats["new_tokens"] == 80
    result = CliRunner().invoke(main, ["run", str(bundles / "1"), "--elastic", "--latency-budget-ms", "5"])
    assert result.exit_code == 2 and "elastic" in result.output and len(result.output.strip().splitlines()) == 1


def test_quantize_keeps_every_width_in_one_store(tmp_path):
    """The shipped mamba2-tiny at widths 1/4 and 1/8 (a trained model: a random one's
    near-ties make a 16-step top-1 gate a coin toss at fp16), quantized as a whole."""
    source, out = tmp_path / "fp32", tmp_path / "fp16"
    result = CliRunner().invoke(main, ["export", "--target", "x86", "--flavor", "portable", "--elastic", "--widths-set",
                                       "1/4,1/8", "--no-validate", "-o", str(source)])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["quantize", str(source), "--quant", "fp16", "-o", str(out),
                                       "--steps", "16", "--long-steps", "32", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert bundle_widths(manifest) == bundle_widths(read_manifest(source)) == ["0.25", "0.125"]
    assert manifest["precision"] == "fp16"
    assert manifest["weights_bytes"] <= 0.6 * read_manifest(source)["weights_bytes"]  # fp16: half, once
    assert all(s["passed"] for s in manifest["validation"]["switching"].values())
    with StreamingSession.from_bundle(out) as session:
        session.prefill([1, 2, 3])
        session.set_width("0.125")
        assert session.step(4).shape == (264,) and session.width == "0.125"


def test_fork_and_restore_keep_their_own_replay_record(bundles):
    rng = np.random.default_rng()
    with StreamingSession.from_bundle(bundles / "elastic", flavor="portable") as session:
        session.widths.replay = 4
        session.prefill(rng.integers(0, 264, 10))
        before = [t for s in session.widths._saved for t in s.tokens]
        other = session.fork()
        for token in (1, 2, 3):
            other.step(token)
        assert [t for s in session.widths._saved for t in s.tokens] == before  # the fork's steps are not ours
        assert [t for s in other.widths._saved for t in s.tokens] == [1, 2, 3]  # it replays from its own start
        snap = session.snapshot()
        session.step(7)
        session.restore(snap)
        assert [t for s in session.widths._saved for t in s.tokens] == []  # restored: replay starts here
        session.set_width("0.5")
        logits = session.set_width("1", widen="replay")
        assert logits is None and session.position == int(snap.position[0])  # nothing to replay: the state as it was


@pytest.mark.parametrize("args, says", [
    (["--widths-set", "1,1/2"], "add --elastic"),
    (["--elastic", "--width", "0.5"], "not --width"),
    (["--elastic", "--widths-set", "1,1"], "at least two different widths"),
    (["--elastic", "--widths-set", "1,1/100"], "error: "),
])  # fmt: skip
def test_bad_elastic_requests_fail_in_one_line_and_write_nothing(tmp_path, args, says):
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["export", "--target", "x86", "-o", str(out), "--no-validate", *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("error: ") and says in lines[-1], result.output
    assert "Traceback" not in result.output and not out.exists()
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--elastic"])
    assert result.exit_code == 2 and "--latency-budget-ms" in result.output


def test_validate_with_an_embedded_reference_cuts_each_width_from_it(bundles, tmp_path):
    """An elastic bundle carrying its widest model: validation extracts every narrower width
    from that model (the widest's own sizes), not the checkpoint it came from."""
    out = tmp_path / "embedded"
    result = CliRunner().invoke(main, ["export", "--model", str(bundles / "model"), "--target", "x86", "--elastic",
                                       "--widths-set", "1/2,1/4", "--embed-reference", "--no-validate", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (bundles / "model").rename(bundles / "model.away")  # only the embedded reference is left to validate against
    try:
        result = CliRunner().invoke(main, ["validate", str(out), "--flavor", "portable", "--steps", "8",
                                           "--long-steps", "16", "--json"])  # fmt: skip
    finally:
        (bundles / "model.away").rename(bundles / "model")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert {"portable", "portable@0.25", "portable switching"} <= set(outcome["flavors"]) and outcome["passed"]
