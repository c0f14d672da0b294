"""A small ONNX graph builder: named nodes, deduplicated constants, deterministic output.

Graph code calls ``g.op("MatMul", a, b)`` and gets back the output name; constants are
numpy arrays turned into initializers once. Names are sequential, so building the same
model twice gives byte-identical files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeseq.export.spec import IN_PLACE_KEY, TensorSpec

DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}


class GraphBuilder:
    def __init__(self, name: str, opset: int, extra_domains: dict[str, int] | None = None, split_k: int | None = None):
        self.name = name
        self.opset = opset
        self.split_k = split_k  # weight products summed over K in blocks of this many (see ``linear``)
        self.domains = {"": opset, **(extra_domains or {})}
        self.nodes: list[onnx.NodeProto] = []
        self.arrays: dict[str, np.ndarray] = {}  # initializers by name, made into tensors at build()
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []  # types of custom ops' outputs (no inference for them)
        self._counts: Counter[str] = Counter()
        self._consts: dict[tuple, str] = {}
        self.in_place: list[str] = []  # state inputs whose present a runner may write over them (``IN_PLACE_KEY``)

    # ---- names -------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counts[hint] += 1
        return f"{hint}_{self._counts[hint]}"

    # ---- values ------------------------------------------------------------------------
    def input(self, spec: TensorSpec) -> str:
        self.inputs.append(helper.make_tensor_value_info(spec.name, DTYPES[spec.dtype], list(spec.shape)))
        return spec.name

    def output(self, value: str, spec: TensorSpec) -> None:
        """Expose ``value`` under the spec's name (an Identity keeps graph code name-free)."""
        self.nodes.append(helper.make_node("Identity", [value], [spec.name], name=self.fresh("out")))
        self.outputs.append(helper.make_tensor_value_info(spec.name, DTYPES[spec.dtype], list(spec.shape)))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer (model weights keep their checkpoint names)."""
        self.arrays[name] = array
        return name

    def const(self, value, dtype: str | None = None) -> str:
        """A constant shared by every use of the same value: an array keeps its dtype,
        a Python number or list is float32 unless ``dtype`` says otherwise."""
        if dtype is None and isinstance(value, np.ndarray):
            dtype = value.dtype
        array = np.asarray(value, dtype=dtype or "float32")
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), array)
        return self._consts[key]

    def ints(self, *values: int) -> str:
        return self.const(list(values), "int64")

    # ---- nodes -------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", output_dtype: str | None = None,
           **attrs) -> str | tuple[str, ...]:  # fmt: skip
        """A node; ``output_dtype`` declares its outputs' element type (for custom-domain ops,
        whose types ONNX shape inference, and so the fp16 converter, cannot know)."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        node = helper.make_node(op_type, list(inputs), names, name=self.fresh(f"n_{op_type}"), domain=domain, **attrs)
        self.nodes.append(node)
        if output_dtype is not None:
            self.value_info += [helper.make_tensor_value_info(n, DTYPES[output_dtype], None) for n in names]
        return names[0] if outputs == 1 else tuple(names)

    # ---- build -------------------------------------------------------------------------
    def build(self, doc: str = "") -> onnx.ModelProto:
        used = {i for n in self.nodes for i in n.input}  # a weight a graph function replaced is not stored
        inits = [numpy_helper.from_array(np.ascontiguousarray(a), k) for k, a in self.arrays.items() if k in used]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits, value_info=self.value_info)
        opsets = [helper.make_opsetid(d, v) for d, v in sorted(self.domains.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeseq", doc_string=doc)
        model.ir_version = min(model.ir_version, 10 if self.opset <= 21 else 11)
        if self.in_place:
            helper.set_model_props(model, {IN_PLACE_KEY: ",".join(self.in_place)})
        return model

    # ---- composite helpers shared by every layer kind --------------------------------
    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def matrix(self, w: dict[str, np.ndarray], prefix: str, name: str) -> str:
        """A projection weight ``w[name + ".weight"]``, stored transposed ([in, out]) for
        MatMul as ``<prefix><name>.weight.t``."""
        return self.weight(f"{prefix}{name}.weight.t", np.ascontiguousarray(w[f"{name}.weight"].T))

    def bias(self, w: dict[str, np.ndarray], prefix: str, name: str) -> str | None:
        """``w[name + ".bias"]`` as ``<prefix><name>.bias``, or None where there is none."""
        key = f"{name}.bias"
        return self.weight(f"{prefix}{key}", w[key]) if key in w else None

    def vector(self, w: dict[str, np.ndarray], prefix: str, name: str) -> str:
        return self.weight(f"{prefix}{name}", w[name])

    def linear(self, x: str, weight: str, bias: str | None = None) -> str:
        """x [..., in] @ weight [in, out] (+ bias). Weights are stored transposed for MatMul.

        With ``split_k`` = s and ``in`` > s, the sum over ``in`` runs in c blocks of the
        largest divisor of ``in`` not above s (at least 8), added at the end:

            x [..., in] -> [..., c, 1, s] @ weight [c, s, out] -> [..., c, 1, out] -> sum over c

        onnxruntime's CPU GEMM accumulates a dot product sequentially, so its rounding error
        grows with ``in``; blocking brings it to the PyTorch reference's level, which matters
        where a recurrence integrates it over thousands of steps. Quantizers need the plain
        2-D MatMul, so graphs meant for quantization are built without it.
        """
        stored = self.stored(weight)
        if stored != weight:
            c, s, _ = self.arrays[stored].shape
            lead = self.op("Shape", x, end=-1)
            blocks = self.op("Reshape", x, self.op("Concat", lead, self.ints(c, 1, s), axis=0))  # [..., c, 1, s]
            partial = self.op("MatMul", blocks, stored)  # [..., c, 1, out]
            y = self.op("ReduceSum", self.op("Squeeze", partial, self.ints(-2)), self.ints(-2), keepdims=0)  # [..., out]
        else:
            y = self.op("MatMul", x, weight)
        return self.op("Add", y, bias) if bias else y

    def stored(self, weight: str) -> str:
        """The initializer ``linear`` multiplies by: ``weight`` [in, out] itself, or, where
        ``split_k`` blocks it, ``<weight>.blocks`` [c, s, out] (the same bytes)."""
        W = self.arrays[weight]
        s = _block(W.shape[0], self.split_k) if self.split_k and W.ndim == 2 else None
        if not s:
            return weight
        return self.weight(f"{weight}.blocks", W.reshape(W.shape[0] // s, s, W.shape[1]))

    def columns(self, weight: str, ids: str) -> str:
        """Columns ``ids`` [...] of a MatMul weight [in, out] as rows [..., in]: a tied
        embedding read from the head's table, so the table is stored once.

            ids -> flat [n] -> Gather(stored table, axis=last) [*lead, n] -> [in, n] -> T -> [..., in]
        """
        stored = self.stored(weight)
        d_in = self.arrays[weight].shape[0]
        flat = self.op("Reshape", ids, self.ints(-1))
        picked = self.op("Gather", stored, flat, axis=self.arrays[stored].ndim - 1)  # [*lead, n]
        rows = self.op("Transpose", self.reshape(picked, d_in, -1), perm=[1, 0])  # [n, in]
        return self.op("Reshape", rows, self.op("Concat", self.op("Shape", ids), self.ints(d_in), axis=0))

    def rmsnorm(self, x: str, weight: str, eps: float) -> str:
        """x / sqrt(mean(x^2) + eps) * weight over the last axis (basic ops, any opset), in
        the pattern onnxruntime fuses into SimplifiedLayerNormalization (and, with the
        residual Add before it, SkipSimplifiedLayerNormalization): Pow(x, 2) -> ReduceMean
        -> Add(eps) -> Sqrt -> Div(x, .) -> Mul(weight)."""
        ms = self.op("ReduceMean", self.op("Pow", x, self.const(2.0)), self.ints(-1), keepdims=1)
        return self.op("Mul", self.op("Div", x, self.op("Sqrt", self.op("Add", ms, self.const(eps)))), weight)

    def split(self, x: str, sizes: Sequence[int], axis: int = -1) -> tuple[str, ...]:
        return self.op("Split", x, self.ints(*sizes), outputs=len(sizes), axis=axis)

    def reshape(self, x: str, *shape: int) -> str:
        return self.op("Reshape", x, self.ints(*shape))


def _block(k: int, most: int) -> int | None:
    """The largest divisor of k in [8, most], if k is longer than ``most``."""
    if k <= most:
        return None
    return next((s for s in range(most, 7, -1) if k % s == 0), None)
