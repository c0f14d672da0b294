"""What onnxruntime-genai needs to load a bundle: one decoder graph and ``genai_config.json``.

onnxruntime-genai runs one decoder graph for the prompt and for every token after it,
fed ``input_ids [B, S]`` and ``attention_mask [B, past + S]``, with the state bound by
name templates: ``past.%d.conv`` / ``past.%d.ssm`` as its conv and recurrent state,
``past.%d.key`` / ``past.%d.value`` as a key/value cache of fixed length (the ring).
It allocates one state buffer per name and feeds it back in place, all conv states of
one shape, all SSM states of one shape, all caches of one length: where layers differ
(per-layer widths, a sliding window beside a global cache) the decoder takes every state
at the largest shape of its kind, hands each layer the leading part it uses and pads what
the layer returns back (so onnxruntime-genai holds the largest shape for every layer).

The decoder is the bundle's step and prefill graphs under one ``If``, so a token costs
what the step graph costs and a prompt what the prefill graph costs:

    input_ids [B,S], attention_mask [B,P+S], past.* (largest shape of their kind)
        past.i.*  = past.i.*[:, :n1, :n2, ...]               (the layer's own shape)
        position = ReduceSum(attention_mask[:, :P])          (tokens each stream holds)
        chunk    = attention_mask[:, P:]                      (this call's padding)
        If S == 1:  step graph     (input_ids, past.*, position)        -> logits [B,V], present.*
        else:       prefill graph  (pads first: input_ids, chunk; past.*, position)
                                                                        -> logits [B,V], present.*
    -> logits [B,1,V] (the last position only), present.* (padded to the largest shape)

The branches read the outer graph's values by name; their weights are lifted into the
outer graph and stored once (identical tensors, e.g. a weight both graphs hold, become
one initializer). Everything else in them is renamed apart.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeseq.errors import EdgeseqError

INT_MAX = np.iinfo(np.int64).max
STATE_NAMES = {  # genai_config keys -> our state tensor names (``edgeseq.export.spec.state_specs``)
    "inputs": {"past_key_names": "past.%d.key", "past_value_names": "past.%d.value",
               "past_conv_names": "past.%d.conv", "past_recurrent_names": "past.%d.ssm"},
    "outputs": {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value",
                "present_conv_names": "present.%d.conv", "present_recurrent_names": "present.%d.ssm"},
}  # fmt: skip
CONFIG_FILE = "genai_config.json"
GENAI_FLAVORS = ("contrib", "portable", "opset27")  # what onnxruntime-genai runs, the preferred first
UNBOUNDED = 1 << 20  # max_length told onnxruntime-genai for a model whose streams have no limit


class GenaiError(EdgeseqError):
    """A bundle onnxruntime-genai cannot run (a state layout it does not take)."""


def why_not_genai(config, io: dict[str, Any]) -> str | None:
    """Why onnxruntime-genai cannot run a model of this I/O (None: it can)."""
    kinds = {t["name"].rsplit(".", 1)[1] for t in io["inputs"] if t["name"].startswith("past.")}
    unknown = sorted(kinds - {"conv", "ssm", "key", "value"})
    if unknown:
        return f"it carries state onnxruntime-genai does not bind ({', '.join(unknown)})"
    return None


# ---- the decoder graph -------------------------------------------------------------------
def decoder_graph(step: onnx.ModelProto, prefill: onnx.ModelProto) -> onnx.ModelProto:
    """The If-decoder of a bundle's step and prefill graphs (see the module docstring)."""
    g_inputs = {i.name: i for i in prefill.graph.input}
    past = [i for i in step.graph.input if i.name.startswith("past.")]
    presents = [o for o in step.graph.output if o.name.startswith("present.") and o.name != "present.position"]
    vocab = step.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["dec.s"], start=1, end=2),
        helper.make_node("Shape", ["attention_mask"], ["dec.total"], start=1, end=2),
        helper.make_node("Sub", ["dec.total", "dec.s"], ["dec.p"]),
        _ints("dec.one", 1),
        helper.make_node("Equal", ["dec.s", "dec.one"], ["dec.is_step"]),
    ]
    largest = _largest_shapes(past)
    outer = {"input_ids": "input_ids"}
    for p in past:
        outer[p.name] = p.name
        if (dims := _dims(p)) != largest[_kind(p.name)]:
            nodes += [
                _ints_node(f"dec.{p.name}.starts", [0] * len(dims)),
                _ints_node(f"dec.{p.name}.ends", [INT_MAX, *dims[1:]]),
                helper.make_node("Slice", [p.name, f"dec.{p.name}.starts", f"dec.{p.name}.ends"], [f"dec.{p.name}"]),
            ]
            outer[p.name] = f"dec.{p.name}"
    if "position" in g_inputs:
        nodes += [
            _ints("dec.zero", 0),
            helper.make_node("Slice", ["attention_mask", "dec.zero", "dec.p", "dec.one"], ["dec.held_mask"]),
            helper.make_node("ReduceSum", ["dec.held_mask", "dec.one"], ["dec.position"], keepdims=0),
        ]
        outer["position"] = "dec.position"
    prefill_outer = dict(outer)
    if "attention_mask" in g_inputs:
        nodes += _pads_first()
        prefill_outer |= {"input_ids": "dec.ids_left", "attention_mask": "dec.mask_left"}
        if any(i.name == "attention_mask" for i in step.graph.input):  # a step graph that takes one too
            outer["attention_mask"] = "dec.chunk_mask"
    lifted = _Lifted()
    out_names = ["logits", *(p.name for p in presents)]
    branches = {
        "then_branch": _branch(step, "then", outer, lifted, out_names),
        "else_branch": _branch(prefill, "else", prefill_outer, lifted, out_names),
    }
    if_outputs = ["dec.logits", *(f"dec.{p.name}" for p in presents)]
    nodes.append(helper.make_node("If", ["dec.is_step"], if_outputs, name="decoder_if", **branches))
    nodes.append(helper.make_node("Unsqueeze", ["dec.logits", "dec.one"], ["logits"]))
    for p in presents:
        dims, want = _dims(p), largest[_kind(p.name)]
        if dims == want:
            nodes.append(helper.make_node("Identity", [f"dec.{p.name}"], [p.name]))
            continue
        pads = [0] * len(dims) + [0, *(w - d for w, d in zip(want[1:], dims[1:]))]
        nodes += [
            _ints_node(f"dec.{p.name}.pads", pads),
            helper.make_node("Pad", [f"dec.{p.name}", f"dec.{p.name}.pads"], [p.name]),
        ]
    past = [_with_dims(p, largest[_kind(p.name)]) for p in past]
    presents = [_with_dims(p, largest[_kind(p.name)]) for p in presents]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        *past,
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, vocab]), *presents]
    graph = helper.make_graph(nodes, "edgeseq_decoder", inputs, outputs, lifted.initializers)
    opsets: dict[str, int] = {}
    for model in (step, prefill):
        for o in model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    decoder = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        producer_name="edgeseq",
        doc_string="edgeseq decoder: If(S == 1, step, prefill)",
    )
    decoder.ir_version = max(step.ir_version, prefill.ir_version)
    return decoder


def _pads_first() -> list[onnx.NodeProto]:
    """This call's ids and mask with each row's pads moved ahead of its tokens (kept in order):
    onnxruntime-genai pads a batch on the right, the prefill graph takes left padding.

        chunk = attention_mask[:, P:]                               [B, S]
        order = TopK(chunk * S + arange(S), S, smallest first)      pads first, each side in order
        ids_left, mask_left = GatherElements(input_ids | chunk, order)
    """
    return [
        _ints("dec.end", INT_MAX),
        helper.make_node("Slice", ["attention_mask", "dec.p", "dec.end", "dec.one"], ["dec.chunk_mask"]),
        _ints("dec.zero_", 0),
        helper.make_node("Squeeze", ["dec.s", "dec.zero_"], ["dec.s_scalar"]),
        helper.make_node("Squeeze", ["dec.zero_", "dec.zero_"], ["dec.zero_scalar"]),
        helper.make_node("Squeeze", ["dec.one", "dec.zero_"], ["dec.one_scalar"]),
        helper.make_node("Range", ["dec.zero_scalar", "dec.s_scalar", "dec.one_scalar"], ["dec.cols"]),
        helper.make_node("Mul", ["dec.chunk_mask", "dec.s"], ["dec.real_rank"]),
        helper.make_node("Add", ["dec.real_rank", "dec.cols"], ["dec.keys"]),
        helper.make_node("TopK", ["dec.keys", "dec.s"], ["dec.sorted", "dec.order"], axis=1, largest=0, sorted=1),
        helper.make_node("GatherElements", ["input_ids", "dec.order"], ["dec.ids_left"], axis=1),
        helper.make_node("GatherElements", ["dec.chunk_mask", "dec.order"], ["dec.mask_left"], axis=1),
    ]


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[1]  # past.3.conv -> conv


def _dims(info: onnx.ValueInfoProto) -> tuple:
    """Shape with the batch axis as None."""
    dims = info.type.tensor_type.shape.dim
    return (None, *(d.dim_value for d in dims[1:]))


def _largest_shapes(states: list[onnx.ValueInfoProto]) -> dict[str, tuple]:
    """Per state kind, the largest extent of every axis over the layers."""
    largest: dict[str, tuple] = {}
    for s in states:
        dims, kind = _dims(s), _kind(s.name)
        have = largest.get(kind, dims)
        if len(have) != len(dims):
            raise GenaiError(f"layers' {kind} states differ in rank; onnxruntime-genai cannot hold them")
        largest[kind] = (None, *(max(a, b) for a, b in zip(have[1:], dims[1:])))
    return largest


def _with_dims(info: onnx.ValueInfoProto, dims: tuple) -> onnx.ValueInfoProto:
    batch = info.type.tensor_type.shape.dim[0]
    shape = [batch.dim_param or batch.dim_value, *dims[1:]]
    return helper.make_tensor_value_info(info.name, info.type.tensor_type.elem_type, shape)


def _ints(name: str, value: int) -> onnx.NodeProto:
    return _ints_node(name, [value])


def _ints_node(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor("", TensorProto.INT64, [len(values)], values)
    )


class _Lifted:
    """The decoder's initializers: each distinct tensor once, under the first name it came by."""

    def __init__(self):
        self.initializers: list[onnx.TensorProto] = []
        self._by_content: dict[bytes, str] = {}
        self._names: set[str] = set()

    def add(self, tensor: onnx.TensorProto) -> str:
        key = _content_key(tensor)
        if key not in self._by_content:
            name = tensor.name if tensor.name not in self._names else f"{tensor.name}.{len(self._names)}"
            lifted = onnx.TensorProto()
            lifted.CopyFrom(tensor)
            lifted.name = name
            self.initializers.append(lifted)
            self._names.add(name)
            self._by_content[key] = name
        return self._by_content[key]


def _content_key(tensor: onnx.TensorProto) -> bytes:
    h = hashlib.sha256()
    h.update(f"{tensor.data_type}:{list(tensor.dims)}".encode())
    h.update(onnx.numpy_helper.to_array(tensor).tobytes())
    return h.digest()


def _branch(model: onnx.ModelProto, tag: str, outer: dict[str, str], lifted: _Lifted,
            out_names: list[str]) -> onnx.GraphProto:  # fmt: skip
    """``model``'s graph as an If branch: its inputs read from ``outer``, its weights
    lifted, every other value renamed ``<tag>/<name>``; outputs ``out_names`` in order."""
    rename = {name: value for name, value in outer.items()}
    for t in model.graph.initializer:
        rename[t.name] = lifted.add(t)
    local = lambda n: rename.get(n, f"{tag}/{n}" if n else n)
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    del graph.input[:]
    _rename(graph, local)
    wanted = {o.name: o for o in model.graph.output}
    missing = [n for n in out_names if n not in wanted]
    if missing:
        raise GenaiError(f"the {tag} graph has no output {missing[0]}; re-export the bundle")
    del graph.output[:]
    for name in out_names:
        out = onnx.ValueInfoProto()
        out.CopyFrom(wanted[name])
        out.name = local(name)
        graph.output.append(out)
    graph.name = f"decoder_{tag}"
    return graph


def _rename(graph: onnx.GraphProto, local) -> None:
    """Rename every value of ``graph`` (and of the subgraphs in its nodes) through ``local``.
    A subgraph's own inputs shadow nothing here: edgeseq graphs name values uniquely."""
    for node in graph.node:
        node.input[:] = [local(n) for n in node.input]
        node.output[:] = [local(n) for n in node.output]
        if node.name:
            node.name = local(node.name)
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                _rename(sub, local)
                sub.input[:] = [_renamed_info(i, local) for i in sub.input]
    for infos in (graph.value_info, graph.output):
        for info in infos:
            info.name = local(info.name)


def _renamed_info(info: onnx.ValueInfoProto, local) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = local(info.name)
    return out


# ---- genai_config.json -------------------------------------------------------------------
def genai_max_length(config) -> int:
    """The longest stream the model takes (a global attention cache's), else ``UNBOUNDED``."""
    return config.stream_limit() or UNBOUNDED


def genai_config(config, io: dict[str, Any], decoder_file: str, tokenizer: dict[str, Any] | None, pad_id: int,
                 max_length: int) -> dict[str, Any]:  # fmt: skip
    """The ``genai_config.json`` of a bundle whose decoder graph is ``decoder_file``; ``io``
    the step graph's I/O (the manifest's). ``max_length``: the longest stream
    onnxruntime-genai is told to allow (prompt and generated tokens together). The cache
    geometry is the decoder's: the largest key state, [B, kv heads, slots, head size]."""
    eos = sorted(tokenizer["eos_ids"]) if tokenizer and tokenizer.get("eos_ids") else []  # none: never stops early
    bos = tokenizer.get("bos_id") if tokenizer else None
    keys = [t["shape"] for t in io["inputs"] if t["name"].startswith("past.") and _kind(t["name"]) == "key"]
    kv_heads, head_size = (max(s[1] for s in keys), max(s[3] for s in keys)) if keys else (1, config.d_model)
    decoder = {
        "session_options": {"log_id": "edgeseq", "provider_options": []},
        "filename": decoder_file,
        "hidden_size": config.d_model,
        "num_attention_heads": kv_heads,  # what onnxruntime-genai allocates by: the cache's heads
        "num_key_value_heads": kv_heads,
        "head_size": head_size,
        "num_hidden_layers": len(config.layers),
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", **STATE_NAMES["inputs"]},
        "outputs": {"logits": "logits", **STATE_NAMES["outputs"]},
    }
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": bos if bos is not None else (eos or [pad_id])[0],
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad_id,
            "context_length": max_length,
            "vocab_size": config.vocab_size,
            "decoder": decoder,
        },
        "search": {
            "do_sample": False, "num_beams": 1, "max_length": max_length, "min_length": 0,
            "past_present_share_buffer": True, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
            "no_repeat_ngram_size": 0, "num_return_sequences": 1, "diversity_penalty": 0.0,
        },
    }  # fmt: skip
