"""Whole-model step and prefill graphs of an extracted model.

    input_ids -> Gather(embedding) -> blocks (past.* in, present.* out) -> final RMSNorm
              -> (prefill: last position unless all_logits) -> MatMul(head) -> logits

The result is cleaned with onnxscript's optimizer (constant folding, dead nodes) and is
deterministic: the same model and options give byte-identical files.
"""

from __future__ import annotations

import numpy as np
import onnx

from edgeseq.errors import EdgeseqError
from edgeseq.export.builder import GraphBuilder
from edgeseq.export.flavors import FLAVORS
from edgeseq.export.layers import block
from edgeseq.export.spec import GraphIO, graph_io
from edgeseq.kinds import get_kind
from edgeseq.model import NestedLM
from edgeseq.shapes import layer_state_shapes
from edgeseq.width import full

INT_MAX = np.iinfo(np.int64).max
SPLIT_K = 64  # fp32 bundles: dot products summed in blocks of up to 64 (accuracy over long streams)


def model_weights(model: NestedLM) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def build_graph(model: NestedLM, kind: str, flavor: str = "portable", all_logits: bool = False,
                split_k: int | None = None, tied_once: bool = False) -> onnx.ModelProto:
    """The ONNX graph of ``model``'s step or prefill, in the given flavor. ``split_k``:
    weight products summed in blocks of that many (``builder.linear``; fp32 bundles use
    ``SPLIT_K``, graphs to be quantized none). ``tied_once``: a tied embedding is read
    from the head's table (``builder.columns``) instead of being stored a second time;
    fp32 and fp16 bundles use it, graphs for the int8/int4 quantizers (which want the
    [V, D] table a plain Gather reads) do not."""
    if flavor not in FLAVORS:
        raise EdgeseqError(f"unknown flavor {flavor!r}; use one of {sorted(FLAVORS)}")
    config, fl = model.config, FLAVORS[flavor]
    for i, spec in enumerate(config.layers):
        for part in spec.parts:
            get_kind(part).check_export(config, i)
    io = graph_io(config, kind, all_logits)
    weights = model_weights(model)
    g = GraphBuilder(f"edgeseq_{kind}", fl.opset, fl.domains, split_k=split_k)
    names = {spec.name: g.input(spec) for spec in io.inputs}
    rank = 2 if kind == "step" else 3
    head = weights["embedding.weight"] if config.tie_embeddings else weights["lm_head.weight"]
    head_t = g.weight("lm_head.weight.t", np.ascontiguousarray(head.T))
    if config.tie_embeddings and tied_once:
        h = g.columns(head_t, names["input_ids"])  # [b, t, d]
    else:
        h = g.op("Gather", g.weight("embedding.weight", weights["embedding.weight"]), names["input_ids"])  # [b, t, d]
    if config.embedding_scale != 1.0:
        h = g.op("Mul", h, g.const(np.float32(config.embedding_scale)))
    if rank == 2:
        h = g.op("Squeeze", h, g.ints(1))  # [b, d]
    position = names.get("position")
    presents: dict[str, str] = {}
    for i, width in enumerate(full(config)):
        past = {k: names[f"past.{i}.{k}"] for k in layer_state_shapes(config, i, width)}
        h, present = block(g, fl, config, i, weights, h, past, position, names.get("attention_mask"), rank)
        presents |= {f"present.{i}.{k}": present[k] for k in past}
    h = g.rmsnorm(h, g.weight("norm_f.weight", weights["norm_f.weight"]), config.norm_eps)
    if rank == 3 and not all_logits:
        h = g.op("Squeeze", g.op("Slice", h, g.ints(-1), g.ints(INT_MAX), g.ints(1)), g.ints(1))
    logits = g.linear(h, head_t)
    outputs = {"logits": logits, **presents}
    if config.uses_position():
        if rank == 3:  # a left pad is no token of its stream
            tokens = g.op("ReduceSum", names["attention_mask"], g.ints(1), keepdims=0)
        else:
            tokens = g.op("Shape", names["input_ids"], start=1, end=2)
        outputs["present.position"] = g.op("Add", position, tokens)
    for spec in io.outputs:
        g.output(outputs[spec.name], spec)
    return optimize(g.build(doc=f"edgeseq {kind} graph, flavor {flavor}"))


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-code removal with onnxscript's optimizer."""
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


def io_of(model: NestedLM, kind: str, all_logits: bool = False) -> GraphIO:
    return graph_io(model.config, kind, all_logits)
