"""The lists a user picks from (``edgeseq.choices``): importable without torch or onnx, and
every choice on them backed by code that honours it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from edgeseq.choices import FLAVORS, FORMATS, PRECISIONS, WRITABLE_FORMATS
from edgeseq.deploy.runtimes import BY_NAME
from edgeseq.families import FAMILIES, Family, get_family, register
from tests.conftest import random_model, small_config

STANDARD_DOMAINS = ("", "ai.onnx")


@pytest.mark.parametrize("module", ["edgeseq.choices", "edgeseq.atomic", "edgeseq.targets"])
def test_imports_neither_torch_nor_onnx(module):
    code = (
        f"import sys, {module}; "
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


# ---- formats -------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_every_offered_format_has_its_family(name):
    family = get_family(name)  # else `--format NAME` is offered and then answered "unknown format"
    assert family.name == name
    assert family.writable == (name in WRITABLE_FORMATS)


def test_the_registry_refuses_a_family_the_list_does_not_name():
    class Gguf(Family):
        name = "gguf"
        description = "llama.cpp files"

    with pytest.raises(ValueError, match="choices.FORMATS"):
        register(Gguf)
    assert "gguf" not in FAMILIES


def test_the_registry_refuses_a_writable_flag_the_list_contradicts():
    before = FAMILIES["mamba_ssm"]

    class WritableMambaSsm(Family):
        name = "mamba_ssm"
        description = "claims to write"
        writable = True

    with pytest.raises(ValueError, match="WRITABLE_FORMATS"):
        register(WritableMambaSsm)
    assert FAMILIES["mamba_ssm"] is before


# ---- flavors and precisions --------------------------------------------------------------
@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_flavor_builds_and_the_ort_flavors_need_no_plugins(flavor):
    ort = pytest.importorskip("onnxruntime")
    from edgeseq.export.graphs import build_graph

    proto = build_graph(random_model(small_config(), torch.float32), "step", flavor)
    custom = sorted({n.domain for n in proto.graph.node} - set(STANDARD_DOMAINS))
    if flavor in BY_NAME["onnxruntime"].flavors:  # the runtime table: plain onnxruntime runs it
        assert set(custom) <= {"com.microsoft"}, custom  # its own contrib ops at most
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # no op library loaded
    else:
        assert custom  # plugin nodes: onnxruntime runs them only as custom ops (the onnxruntime-plugins runtime)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_is_quantized_judged_and_sized(precision):
    pytest.importorskip("onnx")
    from edgeseq.export.quantize import QuantOptions
    from edgeseq.export.spec import TOLERANCES
    from edgeseq.sizing import nested_sizes

    assert QuantOptions(precision).describe()["precision"] == precision
    assert precision in TOLERANCES  # `edgeseq validate` judges it
    assert nested_sizes(small_config())[0].weight_bytes(precision) > 0  # `inspect` and `plan` size it


def test_precisions_run_from_most_to_least_faithful():
    """``targets.plan`` tries precisions in this order, so it must be by fidelity: the
    validation limits loosen along it."""
    pytest.importorskip("onnx")
    from edgeseq.export.spec import TOLERANCES

    limits = [(-TOLERANCES[p].top1_agreement, TOLERANCES[p].kl, TOLERANCES[p].bpb_delta) for p in PRECISIONS]
    for looser, tighter in zip(limits[1:], limits):
        assert all(a > b for a, b in zip(looser, tighter)), (looser, tighter)
