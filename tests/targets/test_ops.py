"""Each target gets graphs its runtime parses: for every shipped profile, precision and
flavor, the written graphs pass the checker for that runtime; the checker itself finds
what a runtime lacks, in subgraphs and local functions too; a combination the runtime
cannot parse is refused with one line before any work, and nothing is written."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgeseq import choices
from edgeseq.cli import main
from edgeseq.export.compat import UnsupportedOpsError, check_flavors, quant_options
from edgeseq.export.flavors import FLAVORS
from edgeseq.export.graphs import build_graph
from edgeseq.export.quantize import QuantOptions, quantize_graph
from edgeseq.export.trt_plugins import DOMAIN as TRT_DOMAIN
from edgeseq.targets import all_targets, get_target
from edgeseq.targets.ops import RUNTIMES, TRT_PLUGIN_DOMAIN, runtime_ops, unsupported_ops
from tests.conftest import random_model, small_config

TARGETS = {t.name: t for t in all_targets()}
TENSORRT_TARGETS = [t.name for t in all_targets() if t.runtime == "tensorrt"]


def combinations() -> list:
    """Every (target, precision, flavor) export accepts: the profile's flavors, and the
    tensorrt flavor on TensorRT targets (``--flavor tensorrt``)."""
    return [
        pytest.param(t.name, precision, flavor, id=f"{t.name}-{precision}-{flavor}")
        for t in all_targets()
        for precision in t.precisions
        for flavor in [*t.flavors, *(["tensorrt"] if t.runtime == "tensorrt" else [])]
    ]


@pytest.fixture(scope="module")
def graphs():
    """Quantized graphs of one small hybrid model, by (flavor, options): targets that share
    a runtime form share them."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    model = random_model(small_config("M M+ S+ M A", d_model=64, vocab_size=264), dtype=torch.float32)
    fp32 = {f: {k: build_graph(model, k, f) for k in ("step", "prefill")} for f in FLAVORS}
    cache = {}

    def get(flavor, options):
        if (flavor, options) not in cache:
            cache[flavor, options] = {k: quantize_graph(g, options) for k, g in fp32[flavor].items()}
        return cache[flavor, options]

    return get


@pytest.mark.parametrize("name, precision, flavor", combinations())
def test_every_target_precision_and_flavor_gives_graphs_its_runtime_parses(graphs, name, precision, flavor):
    target = TARGETS[name]
    options = quant_options(target, precision)
    for kind, graph in graphs(flavor, options).items():
        assert unsupported_ops(graph, runtime_ops(target)) == [], (kind, options.describe())
        if target.runtime == "tensorrt":
            assert not [n for n in graph.graph.node if n.domain == "com.microsoft"], kind


@pytest.mark.parametrize("name", TENSORRT_TARGETS)
def test_tensorrt_targets_take_int4_as_dequantize_linear(name):
    assert quant_options(TARGETS[name], "int4").int4_form == "QDQ"
    assert quant_options(TARGETS["x86-64-cpu"], "int4").int4_form == "MatMulNBits"


def test_each_flavor_declares_the_ops_it_adds(graphs):
    """``Flavor.ops`` (what the early refusal reads) lists every op a flavor's graphs hold
    beyond the portable flavor's."""
    ops = lambda g: {(n.domain, n.op_type) for n in g.graph.node}
    fp32 = QuantOptions("fp32")
    portable = set().union(*(ops(g) for g in graphs("portable", fp32).values()))
    for name, flavor in FLAVORS.items():
        added = set().union(*(ops(g) for g in graphs(name, fp32).values())) - portable
        assert added == {(domain, op) for domain, op, _ in flavor.ops}, name


def test_every_runtime_a_profile_may_name_has_its_ops_stated():
    assert set(RUNTIMES) == set(choices.RUNTIMES)
    assert {runtime_ops(t).opset for t in all_targets() if t.runtime == "onnxruntime"} == {21, 27}  # 1.20, 1.32
    assert {runtime_ops(t).opset for t in all_targets() if t.runtime == "tensorrt"} == {20}  # 10.3


def test_the_checker_module_imports_neither_torch_nor_onnx():
    code = "import sys, edgeseq.targets.ops; heavy = {'torch', 'onnx'} & set(sys.modules); assert not heavy, heavy"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode == 0


# ---- the checker on hand-made graphs --------------------------------------------------
def model_of(nodes, inits=(), opset=21, domains=(), functions=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=list(inits))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def int4_weight(k: int, n: int, block: int, scale_sign: float = 1.0, zero: bool = False):
    """A block-wise int4 DequantizeLinear of a random [k, n] weight feeding a MatMul."""
    import ml_dtypes

    rng = np.random.default_rng()
    q = rng.integers(-7, 8, (k, n)).astype(ml_dtypes.int4)
    scale = (scale_sign * rng.uniform(0.01, 0.1, (-(-k // block), n))).astype(np.float32)
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale, "w_s")]
    inputs = ["w_q", "w_s"]
    if zero:
        inits.append(numpy_helper.from_array(np.ones(scale.shape, dtype=ml_dtypes.int4), "w_z"))
        inputs.append("w_z")
    dq = helper.make_node("DequantizeLinear", inputs, ["w"], name="dq", axis=0, block_size=block)
    return [dq, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], inits


def test_a_correct_int4_block_passes_tensorrt_and_onnxruntime():
    nodes, inits = int4_weight(64, 32, 32)
    model = model_of(nodes, inits)
    assert unsupported_ops(model, runtime_ops(TARGETS["jetson-orin-nano-8gb"])) == []
    assert unsupported_ops(model, runtime_ops(TARGETS["x86-64-cpu"])) == []


@pytest.mark.parametrize("k, n, sign, zero, words", [
    (48, 32, 1.0, False, "block_size 32 must divide axis 0 (48)"),  # TensorRT infers 24 from the shapes
    (64, 31, 1.0, False, "even last dimension"),
    (64, 32, -1.0, False, "positive"),  # onnxruntime's symmetric blocks give such scales
    (64, 32, 1.0, True, "zero point"),
])  # fmt: skip
def test_tensorrt_dequantize_rules(k, n, sign, zero, words):
    nodes, inits = int4_weight(k, n, 32, sign, zero)
    problems = unsupported_ops(model_of(nodes, inits), runtime_ops(TARGETS["jetson-orin-nano-8gb"]))
    assert len(problems) == 1 and words in problems[0] and "DequantizeLinear-21" in problems[0], problems


def test_contrib_and_dynamic_int8_ops_are_listed_for_tensorrt_only():
    w = numpy_helper.from_array(np.zeros((64, 32), dtype=np.int8), "w")
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq"),
        helper.make_node("MatMulInteger", ["xq", "w"], ["y"], name="mmi"),
        helper.make_node("MatMulNBits", ["x", "w"], ["z"], name="nbits", domain="com.microsoft", K=64, N=32, bits=4,
                         block_size=32),
    ]  # fmt: skip
    model = model_of(nodes, [w], domains=["com.microsoft"])
    listed = unsupported_ops(model, runtime_ops(TARGETS["jetson-orin-nano-8gb"]))
    assert [p.split(":")[0] for p in listed] == [
        "ai.onnx DynamicQuantizeLinear-11 (opset 21)", "ai.onnx MatMulInteger-10 (opset 21)",
        "com.microsoft MatMulNBits-1 (opset 1)",
    ]  # fmt: skip
    assert unsupported_ops(model, runtime_ops(TARGETS["x86-64-cpu"])) == []


def test_opsets_past_the_documented_one_pass_only_where_they_added_types():
    """TensorRT 10.0-10.8 document opset 20: Reshape-21 only added int4 types, Sin-22
    changed more; a profile for TensorRT 10.15 (opset 24) takes Sin-22."""
    shape = numpy_helper.from_array(np.array([2, 64], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"], name="r"),
        helper.make_node("Sin", ["r"], ["y"], name="s"),
    ]
    model = model_of(nodes, [shape], opset=22)
    jetson = TARGETS["jetson-orin-nano-8gb"]
    assert [p.split(":")[0] for p in unsupported_ops(model, runtime_ops(jetson))] == ["ai.onnx Sin-22 (opset 22)"]
    newer = dataclasses.replace(jetson, min_runtime_version="10.15")
    assert unsupported_ops(model, runtime_ops(newer)) == []


def test_subgraphs_and_local_functions_are_walked():
    branch = helper.make_graph([helper.make_node("MatMulInteger", ["x", "x"], ["b"], name="inner")], "b", [],
                               [helper.make_tensor_value_info("b", TensorProto.INT32, None)])  # fmt: skip
    cond = numpy_helper.from_array(np.array(True), "cond")
    if_node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch)
    function = helper.make_function("local", "Fn", ["x"], ["z"],
                                    [helper.make_node("GatherBlockQuantized", ["x", "x", "x"], ["z"], domain="com.microsoft")],
                                    [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])  # fmt: skip
    call = helper.make_node("Fn", ["x"], ["z"], name="call", domain="local")
    model = model_of([if_node, call], [cond], domains=["com.microsoft", "local"], functions=[function])
    listed = [p.split(":")[0] for p in unsupported_ops(model, runtime_ops(TARGETS["jetson-orin-nano-8gb"]))]
    assert listed == ["ai.onnx MatMulInteger-10 (opset 21)", "com.microsoft GatherBlockQuantized-1 (opset 1)"]


def test_an_unknown_standard_op_is_listed_and_the_plugin_domain_is_edgeseqs():
    model = model_of([helper.make_node("NoSuchOp", ["x"], ["y"], name="n")])
    assert unsupported_ops(model, runtime_ops(TARGETS["x86-64-cpu"])) == [
        "ai.onnx NoSuchOp-None (opset 21): not an op of ai.onnx"
    ]
    assert TRT_PLUGIN_DOMAIN == TRT_DOMAIN


def test_a_flavor_is_held_to_the_runtime_and_its_version():
    check_flavors(TARGETS["x86-64-cpu"], ["portable", "opset27"])  # its profile asks onnxruntime >= 1.32
    with pytest.raises(UnsupportedOpsError, match="cannot parse the opset27 graphs.*use --flavor portable"):
        check_flavors(TARGETS["android-arm64"], ["opset27"])  # onnxruntime >= 1.20: opset 21
    with pytest.raises(UnsupportedOpsError, match="edgeseq.trt EdgeseqSSDStep-1"):
        check_flavors(TARGETS["x86-64-cpu"], ["tensorrt"])  # plugin nodes are TensorRT's


# ---- refusals before any work ----------------------------------------------------------
def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    import edgeseq.zoo

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(edgeseq.zoo, "load_model", refuse)


def test_an_onnxruntime_int8_preset_on_tensorrt_is_refused_before_any_work(tmp_path, no_work):
    text = (
        Path(get_target("jetson").path)
        .read_text()
        .replace('default_precision = "fp16"', 'default_precision = "fp16"\nint8_preset = "arm64"')
    )
    mine = tmp_path / "my-jetson.toml"
    mine.write_text(text)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        main, ["export", "--target", str(mine), "--quant", "int8", "--width", "0.5", "-o", str(out)]
    )
    line = one_line_error(result)
    assert "MatMulNBits" in line and 'int8_preset = "qdq-weight-only"' in line and "--quant fp16" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-jetson.toml"]


def test_the_opset27_flavor_on_tensorrt_is_refused_before_any_work(tmp_path, no_work):
    result = CliRunner().invoke(main, ["export", "--target", "jetson", "--flavor", "opset27", "--width", "0.5",
                                       "--quant", "int4", "-o", str(tmp_path / "b")])  # fmt: skip
    line = one_line_error(result)
    assert "CausalConvWithState-27" in line and "--flavor portable" in line
    assert list(tmp_path.iterdir()) == []
