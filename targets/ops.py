"""What a target's runtime parses, and the one check that holds a graph to it.

A target profile names its runtime (``runtime.name``) and the oldest version it must work
with (``runtime.min_version``); ``runtime_ops(target)`` turns the two into a ``RuntimeOps``:
the op domains the runtime reads, the standard ops its importer knows, the highest opset
whose op versions it documents, and the node rules it enforces beyond the op type.
``unsupported_ops(model, runtime)`` walks every node of every graph in a model (subgraphs
and local functions included) and lists what the runtime lacks, as
``"<domain> <op>-<version> (opset <n>): <why>"``.

Sources (read through the onnx-tensorrt repository, NVIDIA's TensorRT docs and issues,
and onnxruntime's pull requests; docs/gpu-and-tensorrt.md#what-tensorrts-onnx-parser-reads):

- TensorRT: onnx-tensorrt ``docs/operators.md`` for 10.0/10.1 ("opset 9 to opset 20";
  the ``Y`` rows are ``TENSORRT_STANDARD``) and 10.15 ("opset 9 to opset 24"); INT4 came to
  the parser in 10.0 (its changelog), and its DequantizeLinear importer takes a block-wise
  scale of the input's rank, blocked along one axis, zero points all zero, and an INT4
  input with an even last dimension (``QuantDequantLinearHelper``); TensorRT's
  ``IDequantizeLayer`` docs: blocking on the last or second-to-last axis, scale rank <= 2;
  NVIDIA on block-wise quantization: "only supported in opset 21 onwards"
  (NVIDIA/TensorRT#4298). Plugin nodes are parsed by op type into the registered plugin.
- onnxruntime: every standard op, and the ``com.microsoft`` contrib ops; ONNX 1.16
  (opset 21) came in microsoft/onnxruntime#19745 and block-wise DequantizeLinear on the
  CPU in #20901, both before 1.20; edgeseq's opset-27 graphs run on 1.32 (its tests).

Torch-free; onnx is imported only by the check itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgeseq.targets.profile import Target

if TYPE_CHECKING:
    import onnx

STANDARD = ""  # ai.onnx, as node.domain spells it
TRT_PLUGIN_DOMAIN = "edgeseq.trt"  # edgeseq's plugin nodes (edgeseq.export.trt_plugins.DOMAIN; a test holds them equal)

# Ops whose opset-21 version only added types (int4, uint4, float8 variants) to the one
# before it: a runtime that documents opset 20 reads them as before (ONNX 1.16 release notes).
TYPES_ONLY_AT_21 = frozenset({
    "Cast", "CastLike", "Constant", "ConstantOfShape", "Flatten", "Identity", "If", "Loop", "Pad", "Reshape",
    "Scan", "Shape", "Size", "Squeeze", "Transpose", "Unsqueeze",
})  # fmt: skip
TYPES_ONLY = {21: TYPES_ONLY_AT_21}  # opset -> ops whose version there only widened types

# The ONNX ops TensorRT 10's parser imports (onnx-tensorrt docs/operators.md, TensorRT 10.1, rows marked Y).
TENSORRT_STANDARD = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div", "Dropout",
    "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements",
    "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler",
    "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean",
    "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot",
    "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
    "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round", "ScaledTanh", "Scan", "Scatter",
    "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice",
    "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh",
    "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})  # fmt: skip

Consts = Mapping[str, Any]  # initializer name -> onnx.TensorProto
Rule = Callable[[Any, Consts], "str | None"]  # (node, constants) -> why the runtime refuses it, or None


@dataclass(frozen=True)
class RuntimeOps:
    """What one runtime parses. ``opset``: the highest ai.onnx opset whose op versions it
    documents; ``later``: ops it reads at a later version (op -> that version)."""

    runtime: str
    opset: int
    standard: frozenset[str] | None = None  # ai.onnx op types it imports; None: every standard op
    later: Mapping[str, int] = field(default_factory=dict)
    domains: Mapping[str, frozenset[str] | None] = field(default_factory=dict)  # other domains -> ops (None: any)
    rules: Mapping[str, Rule] = field(default_factory=dict, hash=False)  # op type -> rule for each such node

    def lacks(self, domain: str, op: str, version: int) -> str | None:
        """Why the runtime cannot parse ``op`` at ``version`` of ``domain``, or None."""
        if domain != STANDARD:
            if domain not in self.domains:
                return f"{self.runtime} does not parse the {domain} domain"
            known = self.domains[domain]
            return None if known is None or op in known else f"{self.runtime} has no {op} in {domain}"
        if self.standard is not None and op not in self.standard:
            return f"{self.runtime} does not import {op}"
        if version <= self.opset or version <= self.later.get(op, 0):
            return None
        if all(op in TYPES_ONLY.get(v, ()) for v in range(self.opset + 1, version + 1)):
            return None  # each later version only added types
        return f"{self.runtime} documents ops up to opset {self.opset}"


# ---- TensorRT's node rules -----------------------------------------------------------
def _array(tensor):
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _trt_dequantize(node, consts: Consts) -> str | None:
    """TensorRT's DequantizeLinear: constant positive scales, zero points all zero, and
    per-tensor, per-channel or block-wise scales; INT4 weights of even last dimension;
    blocks along one of the last two axes, each whole."""
    import onnx

    if node.input[1] not in consts:
        return "the scale must be a constant"
    scale = _array(consts[node.input[1]])
    if not (scale > 0).all():
        return "every scale must be positive"
    zero_point = node.input[2] if len(node.input) > 2 else ""
    if zero_point and (zero_point not in consts or _array(consts[zero_point]).any()):
        return "the zero point must be a constant of zeros (TensorRT is symmetric)"
    x = consts.get(node.input[0])
    if x is None:
        return None  # an activation: its shape is known only at build time
    dims = list(x.dims)
    if x.data_type == onnx.TensorProto.INT4 and (not dims or dims[-1] % 2):
        return "INT4 weights need an even last dimension"
    if scale.size == 1:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % len(dims)
    if scale.ndim == 1:
        return None if scale.shape[0] == dims[axis] else "per-channel scales must match the axis"
    return _trt_block(node, dims, list(scale.shape), axis)


def _trt_block(node, dims: list[int], scale: list[int], axis: int) -> str | None:
    if len(scale) != len(dims) or len(dims) > 2:
        return "block-wise scales need the weight's rank, at most 2"
    blocked = [i for i, (d, s) in enumerate(zip(dims, scale)) if d != s]
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    if blocked != [axis] or axis < len(dims) - 2:
        return f"blocking must be along axis {axis}, one of the last two, and only there"
    if block <= 0 or dims[axis] != scale[axis] * block:
        return f"block_size {block} must divide axis {axis} ({dims[axis]}) exactly: TensorRT infers blocks from shapes"
    return None


def _constant_inputs(*positions: int) -> Rule:
    def rule(node, consts: Consts) -> str | None:
        given = [node.input[i] for i in positions if i < len(node.input) and node.input[i]]
        missing = [name for name in given if name not in consts]
        return f"input {missing[0]!r} must be an initializer" if missing else None

    return rule


TENSORRT = RuntimeOps(
    "tensorrt", 20, TENSORRT_STANDARD, MappingProxyType({"DequantizeLinear": 21}),
    MappingProxyType({TRT_PLUGIN_DOMAIN: None}),
    MappingProxyType({"DequantizeLinear": _trt_dequantize, "CumSum": _constant_inputs(1),
                      **{op: _constant_inputs(1) for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")}}),
)  # fmt: skip
ONNXRUNTIME = RuntimeOps("onnxruntime", 21, domains=MappingProxyType({"com.microsoft": None, "ai.onnx.ml": None}))

# runtime name -> (what it parses, (version, highest documented opset) from that version on, opset before them)
RUNTIMES = {
    TENSORRT.runtime: (TENSORRT, (("10.0", 20), ("10.15", 24)), 17),
    ONNXRUNTIME.runtime: (ONNXRUNTIME, (("1.20", 21), ("1.32", 27)), 18),
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def runtime_ops(target: Target) -> RuntimeOps:
    """What ``target``'s runtime parses at the oldest version its profile allows."""
    runtime, opsets, oldest = RUNTIMES[target.runtime]
    since = [opset for version, opset in opsets if _version(version) <= _version(target.min_runtime_version)]
    return replace(runtime, opset=max(since, default=oldest))


# ---- the check ---------------------------------------------------------------------------
def unsupported_ops(model: onnx.ModelProto, runtime: RuntimeOps) -> list[str]:
    """Every (domain, op, version) in ``model`` that ``runtime`` cannot parse, and every node
    that breaks one of its rules, sorted; empty when the runtime parses it all."""
    opsets = {(o.domain if o.domain != "ai.onnx" else STANDARD): o.version for o in model.opset_import}
    functions = {(f.domain, f.name): f for f in model.functions}
    consts = {t.name: t for t in _initializers(model.graph)}
    problems = set()
    for node in _nodes(model.graph.node, functions):
        domain = STANDARD if node.domain in ("", "ai.onnx") else node.domain
        version = _op_version(node.op_type, domain, opsets.get(domain, 1))
        where = f"{domain or 'ai.onnx'} {node.op_type}-{version} (opset {opsets.get(domain, 1)})"
        if version is None:
            problems.add(f"{where}: not an op of {domain or 'ai.onnx'}")
        elif why := runtime.lacks(domain, node.op_type, version):
            problems.add(f"{where}: {why}")
        elif (rule := runtime.rules.get(node.op_type)) and domain == STANDARD and (why := rule(node, consts)):
            problems.add(f"{where} node {node.name!r}: {why}")
    return sorted(problems)


def _op_version(op: str, domain: str, opset: int) -> int | None:
    """The op's version a model importing ``domain`` at ``opset`` uses: its since_version
    for the ONNX domains, the domain's version for any other."""
    import onnx

    if domain not in (STANDARD, "ai.onnx.ml"):
        return opset
    try:
        return onnx.defs.get_schema(op, opset, domain).since_version
    except onnx.defs.SchemaError:
        return None


def _nodes(nodes, functions: Mapping) -> Iterator:
    """Every node of a graph, of its subgraphs (If, Loop, Scan bodies) and of the local
    functions it calls, in place of the calls themselves."""
    for node in nodes:
        if (node.domain, node.op_type) in functions:
            yield from _nodes(functions[(node.domain, node.op_type)].node, functions)
            continue
        yield node
        for sub in _subgraphs(node):
            yield from _nodes(sub.node, functions)


def _subgraphs(node) -> list:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else list(a.graphs))]


def _initializers(graph) -> Iterator:
    """Initializers and Constant outputs, of the graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            yield _named(node.attribute[0].t, node.output[0])
        for sub in _subgraphs(node):
            yield from _initializers(sub)


def _named(tensor, name: str):
    tensor = type(tensor).FromString(tensor.SerializeToString())
    tensor.name = name
    return tensor
