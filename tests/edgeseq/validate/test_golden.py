"""Golden files on the numpy toy: what is kept, that replay judges as live comparison does,
that the long stream costs constant bytes, old files refused, and no torch on that path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from edgeseq.errors import OutputExistsError
from edgeseq.validate.compare import compare
from edgeseq.validate.golden import (
    GOLDEN_FORMAT,
    HEADER_KEY,
    KEPT_CALLS,
    GoldenError,
    compare_golden,
    kept_calls,
    load_golden,
    record_golden,
    save_golden,
)
from tests.edgeseq.validate.validate_toy import N, ToyRunner, V, toy_io

ROOT = Path(__file__).parents[3]


@pytest.fixture
def seed():
    return int(np.random.default_rng().integers(2**31))


def _record(seed: int, **kwargs):
    """Prompts through a prefill graph (whole), decode and long streams through the step graph."""
    kwargs = {"prompts": [np.array([1, 2, 3])], "steps": 5, "long_steps": 40, "seed": seed} | kwargs
    return record_golden(ToyRunner(seed, "ref"), toy_io(), prefill=(ToyRunner(seed), toy_io("prefill")),
                         oracle=ToyRunner(seed, "fp64", dtype=np.float64), **kwargs)  # fmt: skip


def test_kept_calls_end_at_the_last_and_are_at_most_the_cap():
    rng = np.random.default_rng()
    for calls in [1, 2, KEPT_CALLS, KEPT_CALLS + 1, *rng.integers(1, 20_000, 20).tolist()]:
        kept = kept_calls(calls)
        assert kept[-1] == calls - 1 and kept[0] >= 0 and len(kept) <= KEPT_CALLS
        assert np.all(np.diff(kept) > 0) and len(set(np.diff(kept).tolist())) <= 1  # evenly spaced
        assert len(kept) == min(calls, KEPT_CALLS) or len(kept) >= KEPT_CALLS // 2


def test_round_trip_keeps_tokens_logits_and_last_state_only(tmp_path, seed):
    golden = _record(seed, info={"model": "toy"})
    loaded = load_golden(save_golden(tmp_path / "g.safetensors", golden))
    assert [r.phase for r in loaded.records] == ["prefill", "decode", "long_stream"]
    assert loaded.io == toy_io() and loaded.info["model"] == "toy" and loaded.info["reference"]["name"] == "ref"
    for a, b in zip(golden.records, loaded.records):
        assert (a.whole, a.start, list(a.final)) == (b.whole, b.start, list(b.final))
        for x, y in [
            (a.tokens, b.tokens),
            (a.kept, b.kept),
            (a.logits, b.logits),
            *zip(a.final.values(), b.final.values()),
        ]:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    prefill, decode, long = loaded.records
    assert prefill.whole and prefill.logits.shape == (1, 1, V) and prefill.kept.tolist() == [2]
    assert decode.tokens.shape == (1, 5) and decode.kept.tolist() == list(range(5)) and decode.oracle_delta is None
    assert long.tokens.shape == (1, 40) and long.oracle_delta.shape == long.logits.shape == (40, 1, V)
    assert set(long.final) == {"present.0.ssm", "present.position"} and long.final["present.position"].tolist() == [40]
    # the toy's fp32 and fp64 runs differ by float32 rounding: the delta is small but kept
    assert 0 < np.abs(long.oracle_delta).max() < 1e-4 * max(1.0, np.abs(long.logits).max())
    with safe_open(str(tmp_path / "g.safetensors"), framework="np") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "/start/" in k]  # every record starts from zeros


def test_what_the_reference_took_is_what_is_kept(seed):
    """The decode stream's tokens are the reference's greedy choices, the long stream's the
    oracle's; the final state is the reference's after the last token."""
    reference, oracle = ToyRunner(seed), ToyRunner(seed, dtype=np.float64)
    decode, long = record_golden(
        reference, toy_io(), prompts=(), steps=6, long_steps=7, oracle=oracle, seed=seed
    ).records
    np.testing.assert_array_equal(decode.tokens[0, 1:], decode.logits[:-1, 0].argmax(-1))
    np.testing.assert_array_equal(long.tokens[0, 1:], [np.argmax(long.oracle_logits(k)[0]) for k in range(6)])
    fp64 = [(s["past.0.ssm"] @ oracle.A.T + oracle.E[s["input_ids"][:, 0]]) @ oracle.C for s in oracle.seen]
    np.testing.assert_allclose([long.oracle_logits(k) for k in range(7)], fp64, rtol=1e-9, atol=1e-9)
    last = reference.seen[-1]
    h = last["past.0.ssm"].astype(np.float64) @ reference.A.T + reference.E[last["input_ids"][:, 0]]
    np.testing.assert_allclose(long.final["present.0.ssm"], h, rtol=1e-6)


def test_a_non_zero_start_is_stored_and_replayed(tmp_path, seed):
    rng = np.random.default_rng(seed)
    start = {"past.0.ssm": rng.normal(size=(1, N)).astype(np.float32), "position": np.array([5])}
    golden = record_golden(ToyRunner(seed), toy_io(), prompts=(), steps=4, long_steps=0, state=start, seed=seed)
    loaded = load_golden(save_golden(tmp_path / "g.safetensors", golden))
    np.testing.assert_array_equal(loaded.records[0].start["past.0.ssm"], start["past.0.ssm"])
    assert loaded.records[0].final["present.position"].tolist() == [9]
    assert compare_golden(ToyRunner(seed), loaded)
    loaded.records[0].start = None  # from zeros instead, the same tokens give other logits
    assert not compare_golden(ToyRunner(seed), loaded)


def test_replay_judges_as_live_comparison(seed):
    """Each phase's verdict and logits statistics match ``compare`` on the same runners;
    the long stream's distances from fp64 are the live ones at the kept calls."""
    io, tokens = toy_io(), np.random.default_rng(seed).integers(0, V, (1, 3))
    prompts = [np.random.default_rng(seed + 1).integers(0, V, (1, n)) for n in (1, 4)]
    golden = record_golden(ToyRunner(seed), io, prompts=prompts, tokens=tokens, steps=12, long_steps=600,
                           oracle=ToyRunner(seed, dtype=np.float64), seed=seed)  # fmt: skip
    kept = golden.records[-1].kept
    assert len(kept) == 200 and kept[-1] == 599  # every third call, the last one kept
    for candidate, precision in [({}, "fp32"), ({"a_scale": 1.0002}, "fp32"), ({"logit_offset": 3e-4}, "int8")]:
        live = compare(ToyRunner(seed), ToyRunner(seed, **candidate), io, tolerance=precision, prompts=prompts,
                       tokens=tokens, steps=12, long_steps=600, seed=seed, oracle=ToyRunner(seed, dtype=np.float64))  # fmt: skip
        replay = compare_golden(ToyRunner(seed, **candidate), golden, tolerance=precision)
        assert list(replay.phases) == list(live.phases) == ["prefill", "decode", "long_stream"]
        for phase in ("prefill", "decode"):
            a, b = live.phases[phase].outputs["logits"], replay.phases[phase].outputs["logits"]
            assert a.max_abs == pytest.approx(b.max_abs, rel=1e-9, abs=1e-12) and a.top1_agreement == b.top1_agreement
            assert bool(live.phases[phase]) == bool(replay.phases[phase]), (phase, candidate)
        a, b = live.phases["long_stream"].oracle_drift, replay.phases["long_stream"].oracle_drift
        np.testing.assert_allclose(np.array(a.candidate)[kept], b.candidate, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(np.array(a.reference)[kept], b.reference, rtol=1e-6, atol=1e-12)
        assert (
            replay.settings["calls_run"]["long_stream"] == 600
            and replay.settings["series_steps"]["long_stream"] == kept.tolist()
        )
        assert bool(live.phases["long_stream"]) == bool(replay.phases["long_stream"]), candidate
    bad = compare_golden(ToyRunner(seed, a_scale=1.0002), golden)  # an error that accumulates over the stream
    assert "drift_fp64" in {f.kind for f in bad.phases["long_stream"].failures}


def test_failures_per_phase(tmp_path, seed):
    path = save_golden(tmp_path / "g.safetensors", _record(seed, steps=30, long_steps=50))
    assert compare_golden(ToyRunner(seed), path)
    bad = compare_golden(ToyRunner(seed, logit_offset=1e-3), path)
    metrics = {(f.phase, getattr(f, "metric", f.kind)) for f in bad.failures}
    assert {("prefill", "prefill_logit"), ("decode", "max_abs_logit"), ("long_stream", "drift_fp64")} <= metrics
    skewed = compare_golden(ToyRunner(seed, position_skew=1), path)  # the final state is judged exactly
    assert {(f.phase, f.output) for f in skewed.failures} == {
        (p, "present.position") for p in ("prefill", "decode", "long_stream")
    }
    dropped = compare_golden(ToyRunner(seed, drop="present.0.ssm"), path)  # cannot go on: says so, no crash
    assert {f.kind for f in dropped.failures} == {"missing_output"}


def test_prefill_candidate_takes_the_prompts_whole_and_hands_off_to_the_step_graph(tmp_path, seed):
    """Given a prefill graph, it takes the prompts the reference took whole, and is held to
    the step graph fed them token by token (the handoff phase, as live comparison does)."""
    golden = load_golden(save_golden(tmp_path / "g.safetensors", _record(seed, prompts=[np.array([4, 1, 7, 2, 9])])))
    assert golden.prefill_io == toy_io("prefill")
    prefill = ToyRunner(seed)
    good = compare_golden(ToyRunner(seed), golden, prefill_candidate=prefill)
    assert good and list(good.phases) == ["prefill", "handoff", "decode", "long_stream"]
    assert [s["input_ids"].shape for s in prefill.seen[:1]] == [(1, 5)]  # the whole prompt, one call
    skewed = compare_golden(ToyRunner(seed), golden, prefill_candidate=ToyRunner(seed, logit_offset=0.3))
    assert {f.phase for f in skewed.failures} == {"prefill", "handoff"}


def test_long_stream_costs_constant_bytes(tmp_path, seed):
    """No state per call: a stream 10x longer keeps the same number of logits."""
    sizes = {}
    for steps in (3 * KEPT_CALLS, 30 * KEPT_CALLS):
        path = save_golden(tmp_path / f"{steps}.safetensors", _record(seed, long_steps=steps))
        sizes[steps] = path.stat().st_size
        assert len(load_golden(path).records[-1].kept) <= KEPT_CALLS
    # the token ids grow by 8 bytes a step; everything else is the same
    grown = sizes[30 * KEPT_CALLS] - sizes[3 * KEPT_CALLS]
    assert 0 < grown <= 8 * 27 * KEPT_CALLS + 64, sizes


def test_overwrite_old_format_damaged_or_missing(tmp_path, seed):
    path = save_golden(tmp_path / "g.safetensors", _record(seed))
    with pytest.raises(OutputExistsError):
        save_golden(path, _record(seed))
    save_golden(path, _record(seed), overwrite=True)
    with pytest.raises(GoldenError, match="not found"):
        load_golden(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(GoldenError, match="not a readable golden file"):
        load_golden(tmp_path / "bad.safetensors")
    old = {"format": 1, "state_pairs": [], "info": {}, "calls": [{"phase": "golden", "stream": None}]}
    save_file({"000000/in/x": np.zeros(2, np.float32)}, str(tmp_path / "old.safetensors"),
              metadata={HEADER_KEY: json.dumps(old)})  # fmt: skip
    with pytest.raises(GoldenError) as caught:
        load_golden(tmp_path / "old.safetensors")
    message = str(caught.value)
    assert "\n" not in message and f"format 1 and this edgeseq reads format {GOLDEN_FORMAT}" in message
    assert "--save-golden" in message


def test_golden_path_never_imports_torch(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from edgeseq.validate.golden import compare_golden, load_golden, record_golden, save_golden
        from edgeseq.testing import assert_golden_parity
        from tests.edgeseq.validate.validate_toy import ToyRunner, toy_io
        golden = record_golden(ToyRunner(3), toy_io(), steps=4, long_steps=8, oracle=ToyRunner(3, dtype=np.float64))
        path = save_golden({str(tmp_path / "g.safetensors")!r}, golden)
        assert compare_golden(ToyRunner(3), load_golden(path))
        assert_golden_parity(ToyRunner(3), path, "fp32")
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
