"""The runtime table: which runtime runs which flavor, and the target's execution providers
and threads reaching the runner that validation, ``run`` and ``bench`` use."""

from __future__ import annotations

import os

import onnx
import pytest
import torch

from edgeseq.choices import FLAVORS
from edgeseq.deploy import runtimes
from edgeseq.deploy.bundle import BundleError
from edgeseq.deploy.runtimes import Placement, open_runner, runnable_here, runtimes_for
from edgeseq.export.graphs import build_graph
from edgeseq.export.spec import graph_io
from tests.conftest import random_model, small_config


def test_every_flavor_has_a_runtime_and_onnxruntime_streams_the_portable_graphs():
    for flavor in FLAVORS:
        assert runtimes_for(flavor, streaming=False), flavor
    assert [r.name for r in runtimes_for("portable")] == ["onnxruntime"]
    assert [r.name for r in runtimes_for("tensorrt")] == ["onnxruntime-plugins"]  # plugin nodes as custom ops
    assert {r.name for r in runtimes_for("tensorrt", streaming=False)} == {"onnxruntime-plugins", "tensorrt"}
    assert runnable_here("portable").name == "onnxruntime" and runnable_here("opset27").plugins is None


def test_placement_takes_the_profile_capped_by_this_machine():
    target = {"threads": 10_000, "execution_providers": ["TensorrtExecutionProvider", "CPUExecutionProvider"]}
    placed = Placement.of_target(target)
    assert placed.threads == os.cpu_count() and placed.providers == tuple(target["execution_providers"])
    assert Placement.of_target(target, threads=1).threads == 1 and Placement.of_target(target, threads=0).threads is None
    assert Placement.of_target({"threads": 1}).threads == 1


@pytest.fixture
def bundle(tmp_path):
    model = random_model(small_config("M M+"), dtype=torch.float32)
    (tmp_path / "portable").mkdir()
    onnx.save(build_graph(model, "step", "portable"), tmp_path / "portable" / "step.onnx")
    manifest = {
        "graphs": {"portable": {"step": "portable/step.onnx"}, "exotic": {"step": "exotic/step.onnx"}},
        "io": {"step": graph_io(model.config, "step").to_dict()},
        "target": {"threads": 1, "execution_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
    }
    return tmp_path, manifest


def test_the_runner_gets_the_targets_providers_and_threads(bundle):
    root, manifest = bundle
    runner = open_runner(root, manifest, "portable", "step")
    assert runner.intra_op_threads == 1
    import onnxruntime as ort

    want = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    assert runner.providers_requested == [*want, "CPUExecutionProvider"]
    with runner:
        assert runner.providers_used[-1] == "CPUExecutionProvider"


def test_a_flavor_no_runtime_here_streams_is_refused_in_one_line(bundle, monkeypatch):
    root, manifest = bundle
    monkeypatch.setattr(runtimes.Runtime, "available", lambda self: self.name != "onnxruntime-plugins")
    with pytest.raises(BundleError, match="onnxruntime-plugins") as err:
        open_runner(root, manifest, "tensorrt", "step")
    assert "\n" not in str(err.value) and "pip install" in str(err.value)
