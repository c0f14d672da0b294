"""Golden files of real bundles through the CLI: small, a long stream inside, a replay that
passes for the bundle it was recorded from and fails once one weight is damaged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from edgeseq.cli import main
from edgeseq.deploy.bundle import read_manifest, write_manifest
from edgeseq.families import save_checkpoint
from edgeseq.validate.golden import KEPT_CALLS, load_golden
from tests.conftest import random_model, small_config

LONG = KEPT_CALLS + 37  # long enough that the long stream keeps a subset of its calls


def _export(out, *args: str) -> None:
    result = CliRunner().invoke(main, ["export", "--target", "x86", "-o", str(out), "--no-validate", *args])
    assert result.exit_code == 0, result.output


def _validate(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["validate", *map(str, args), "--json"])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, json.loads(result.output)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(bundle, golden) of a random hybrid (Mamba2, windowed attention, MLPs; no global
    attention, whose cache would cap the stream) at width 1/2, fp32; the golden as
    --save-golden writes it. Not a byte vocabulary, so validation skips the slow held-out gate."""
    root = tmp_path_factory.mktemp("golden")
    config = small_config("M M+ S+ M")
    save_checkpoint(random_model(config, dtype=torch.float32), root / "model")
    _export(root / "bundle", "--model", str(root / "model"), "--width", "0.5", "--quant", "fp32")
    golden = root / "golden.safetensors"
    code, _ = _validate(root / "bundle", "--flavor", "portable", "--steps", "24", "--long-steps", LONG,
                        "--save-golden", golden)  # fmt: skip
    assert code == 0
    return root / "bundle", golden


def _state_bytes(manifest: dict) -> int:
    past = [t for t in manifest["io"]["step"]["inputs"] if t["name"].startswith("past.")]
    return sum(4 * int(np.prod([d for d in t["shape"] if isinstance(d, int)])) for t in past)


def test_golden_keeps_no_state_per_call_and_a_long_stream(recorded):
    bundle, path = recorded
    manifest, golden = read_manifest(bundle), load_golden(path)
    assert [r.phase for r in golden.records] == ["prefill"] * 4 + ["decode", "long_stream"]
    long = golden.records[-1]
    assert long.tokens.shape == (1, LONG) and long.oracle_delta is not None and len(long.kept) <= KEPT_CALLS
    assert all(r.start is None for r in golden.records)  # every stream starts from zeros
    # what it may hold: one state per record, the kept logits (fp64 beside fp32 on the long
    # stream), the tokens and a header; a per-call state would be 24 + LONG states more
    vocab = long.logits.shape[-1]
    logits = 4 * vocab * (4 + 24 + 2 * len(long.kept))
    tokens = 8 * (sum(r.tokens.size for r in golden.records) + sum(r.kept.size for r in golden.records))
    bound = 6 * _state_bytes(manifest) + logits + tokens + 64 * 1024
    assert path.stat().st_size <= bound


def test_replay_passes_for_its_bundle_and_fails_with_one_damaged_weight(recorded, tmp_path):
    bundle, golden = recorded
    code, doc = _validate(bundle, "--flavor", "portable", "--golden", golden)
    assert code == 0 and doc["passed"], doc
    phases = doc["flavors"]["portable"]["result"]["phases"]
    assert list(phases) == ["prefill", "handoff", "decode", "long_stream"] and "oracle_drift" in phases["long_stream"]
    assert doc["flavors"]["portable"]["result"]["settings"]["calls_run"]["long_stream"] == LONG

    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    step = damaged / "portable.step.onnx"
    model = onnx.load(step)
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    victim = weights[np.random.default_rng().integers(len(weights))]
    victim.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(victim) * np.float32(1.5), victim.name))
    onnx.save(model, step)
    manifest = read_manifest(damaged, verify=False)
    write_manifest(damaged, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})
    code, doc = _validate(damaged, "--flavor", "portable", "--golden", golden)
    assert code == 1 and not doc["passed"], victim.name
    failed = {f["phase"] for f in doc["flavors"]["portable"]["result"]["failures"]}
    # the step graph is damaged: its streams fail, and so does the prefill graph's handoff to it;
    # the prompts themselves go through the (intact) prefill graph
    assert failed == {"handoff", "decode", "long_stream"}, (victim.name, failed)


@pytest.mark.slow
def test_golden_of_a_shipped_bundle_is_a_fraction_of_it(tmp_path):
    """mamba2-tiny at width 1/4, int8 (the smallest shipped bundle), validation's defaults."""
    _export(tmp_path / "bundle", "--width", "1/4", "--quant", "int8")
    golden = tmp_path / "golden.safetensors"
    code, _ = _validate(tmp_path / "bundle", "--flavor", "portable", "--save-golden", golden)
    assert code == 0
    bundle_bytes = sum(f.stat().st_size for f in (tmp_path / "bundle").rglob("*") if f.is_file())
    # measured 0.97x: the bundle keeps its weights once (2.9 MB); the golden is logits, tokens and a few states
    assert golden.stat().st_size <= 1.25 * bundle_bytes
    assert load_golden(golden).records[-1].tokens.shape == (1, 4096)
