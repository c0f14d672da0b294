"""Validation cannot be fooled: one damaged weight in any graph of a bundle, of any
precision and flavor, fails it, while the same bundle undamaged passes the same checks.

The damage (``edgeseq.testing.damage_graph``) shuffles the rows of one weight drawn at
random (a fresh draw each run, printed on failure) and re-signs the manifest, as a buggy
exporter would leave it: the sha256 check cannot notice, only the comparison can.
``scripts/mutation_matrix.py`` damages every weight of every graph, for the counts.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgeseq.cli import main
from edgeseq.deploy.bundle import read_manifest
from edgeseq.deploy.pipeline import ExportRequest, export_bundle
from edgeseq.deploy.runtimes import runnable_here
from edgeseq.deploy.validation import reference_model, validate_flavor
from edgeseq.testing import damage_graph
from edgeseq.width import WidthSpec

# Small settings that still pass every undamaged bundle below (the control in each test).
SETTINGS = {"steps": 32, "long_steps": 64, "prompts": 2, "heldout": (8, 128)}
# Each precision on one shipped model; the two models' kinds (Mamba2, attention, MLP) both damaged.
BUNDLES = {"fp32": "mamba2-tiny", "fp16": "hybrid-tiny", "int8": "hybrid-tiny", "int4": "mamba2-tiny"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("mutation")
    out = {}
    for precision, model in BUNDLES.items():
        path = root / f"{model}-{precision}"
        export_bundle(ExportRequest(model, "x86", WidthSpec.parse("1/4"), path, precision=precision, validate=False))
        out[precision] = path
    return out


def _validate(path, flavor, model):
    s = SETTINGS
    return validate_flavor(path, read_manifest(path), model, flavor, s["steps"], s["long_steps"], s["prompts"], "cpu",
                           threads=1, heldout=s["heldout"])  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(BUNDLES))
def test_one_damaged_weight_in_any_graph_fails_validation(bundles, precision, tmp_path):
    source = bundles[precision]
    manifest = read_manifest(source)
    model, _ = reference_model(source, manifest, "cpu")  # the damaged copies' reference too
    flavors = [f for f in manifest["flavors"] if runnable_here(f)]
    assert len(flavors) >= 2  # x86: portable and opset27
    seed = int(np.random.default_rng().integers(2**31))
    for flavor in flavors:
        control = _validate(source, flavor, model)
        assert control, f"undamaged {precision} {flavor}: {control.summary()}"
        for kind in ("step", "prefill"):
            damaged = tmp_path / f"{flavor}-{kind}"
            shutil.copytree(source, damaged)
            weight = damage_graph(damaged, flavor, kind, seed=seed)
            verdict = _validate(damaged, flavor, model)
            assert not verdict, f"{precision} {flavor}/{kind}.onnx with {weight} shuffled (seed {seed}) passed"


@pytest.mark.slow
def test_damaged_fp16_prefill_of_a_jetson_bundle_fails_edgeseq_validate(tmp_path):
    """The report that started this: a jetson bundle (fp16), one weight matrix of
    portable/prefill.onnx damaged and the manifest re-signed, passed `edgeseq validate`."""
    path = tmp_path / "jetson"
    manifest = export_bundle(ExportRequest("mamba2-tiny", "jetson", WidthSpec.parse("1/4"), path, validate=False))
    assert manifest["precision"] == "fp16"
    args = ["validate", str(path), "--flavor", "portable", "--steps", "32", "--long-steps", "64", "--device", "cpu"]
    assert CliRunner().invoke(main, args).exit_code == 0
    weights = damage_graph(path, "portable", "prefill", seed=int(np.random.default_rng().integers(2**31)))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, f"{weights} shuffled: {result.output}"
    assert "FAIL" in result.output and "prefill" in result.output
