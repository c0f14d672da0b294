"""One weight store for every nested width: each width's weights are prefixes of it.

A narrower width keeps some slices of each of the widest width's tensors along one axis
(heads, channels, rows of a quantized matrix), which are rarely its leading bytes: a MatMul
weight [in, out] nested on ``out`` keeps columns, and in_proj's output is the concatenation
[z | x | B | C | dt] of which each width keeps a leading part of every segment. So the
store holds each widest tensor F in a layout made for nesting:

    S = F moved so the nested axis a is the outer one, its slices in nesting order:
        [slices the narrowest width keeps | those the next one adds | ... | the rest]

and every width's tensor is a prefix of S's bytes. A graph whose tensor is not exactly
that prefix reads it as ``<name>.stored`` and restores its own layout in two nodes that
onnxruntime folds into a constant when it loads the graph (the graph computes exactly
what the width's own graph computes):

    <name>.stored [n, ...] (bytes [0, n * row) of S) -> Gather(axis 0, order) -> Transpose -> <name>

Which slices a width keeps is read from the tensors themselves, not from the layer kinds'
maps: by then the graphs hold constants the exporter folded (the conv taps, -exp(A_log)),
split-K blocks and quantized blocks, none of which are the checkpoint's parameters. A
width's tensor W is matched to a widest tensor F of its dtype and rank that differs in one
axis, each slice of W to an equal slice of F; a tensor that matches nothing is stored as
it is. Every restored tensor is checked against the width's own, bit for bit, before any
graph is changed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class _Tensor:
    """A large initializer of one graph: where it lives and its values."""

    graph: onnx.GraphProto
    proto: onnx.TensorProto
    array: np.ndarray


@dataclass
class _Family:
    """A widest tensor and the narrower tensors that are its slices along ``axis``."""

    full: np.ndarray
    axis: int
    members: list[tuple[_Tensor, np.ndarray]] = field(default_factory=list)  # (tensor, F's indices it keeps)
    order: np.ndarray | None = None  # F's slices in store order


@dataclass
class Shared:
    """What ``share_prefixes`` did: the store's blobs (bytes, with the prefix lengths graphs
    read) for ``edgeseq.deploy.bundle.write_graphs``, and what each width reads."""

    blobs: list[tuple[bytes, list[int]]]
    restored: int  # tensors read through a Gather/Transpose restore
    prefixes: int  # tensors read as a plain prefix of a blob
    alone: int  # narrower tensors stored on their own (no widest tensor holds them)


def share_prefixes(widest: dict[str, onnx.ModelProto], narrower: dict[str, onnx.ModelProto],
                   least_bytes: int = 1024) -> Shared:  # fmt: skip
    """Rewrite the graphs in place so that every tensor of the ``narrower`` widths' graphs
    (file name -> proto) that is a set of slices of a ``widest`` graph's tensor reads a
    prefix of that tensor's store layout; the widest graphs read the layout too. Tensors
    under ``least_bytes`` (which the bundle keeps inside its graphs) are left as they are."""
    index = _SliceIndex([t for model in widest.values() for t in _large(model.graph, least_bytes)])
    families: dict[int, _Family] = {}
    whole: list[tuple[_Tensor, int]] = []  # narrower tensors equal to a widest one
    alone = 0
    for model in narrower.values():
        for t in _large(model.graph, least_bytes):
            if (k := index.same(t.array)) is not None:
                whole.append((t, k))
                continue
            found = index.find(t)
            family = None if found is None else families.setdefault(found[0], _Family(index.unique[found[0]], found[1]))
            if family is None or family.axis != found[1]:
                alone += 1
                continue
            family.members.append((t, found[2]))
    for t, k in whole:  # a width that keeps all of a nested tensor reads the same layout
        if k in families:
            families[k].members.append((t, np.arange(index.unique[k].shape[families[k].axis])))
    for k, family in list(families.items()):
        family.members += [(t, np.arange(family.full.shape[family.axis])) for t in index.copies[k]]
        if not _order(family):
            alone += len(family.members) - len(index.copies[k])
            del families[k]
    blobs: dict[bytes, set[int]] = {}
    restored = prefixes = 0
    for family in families.values():
        stored = _stored(family)
        lengths = blobs.setdefault(stored, set())
        for t, kept in family.members:
            rewrote = _read_prefix(t, family, kept, stored)
            restored += rewrote
            prefixes += not rewrote
            lengths.add(len(stored) // family.full.shape[family.axis] * len(kept))
    return Shared([(b, sorted(n)) for b, n in blobs.items()], restored, prefixes, alone)


def _large(graph: onnx.GraphProto, least_bytes: int) -> Iterator[_Tensor]:
    """Initializers of ``graph`` and its subgraphs of at least ``least_bytes``."""
    for g in _graphs(graph):
        for proto in g.initializer:
            if len(proto.raw_data) >= least_bytes:
                yield _Tensor(g, proto, numpy_helper.to_array(proto))


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _graphs(sub)


class _SliceIndex:
    """The widest tensors (each distinct one once) and their slices along every axis, by
    content, to find where a narrower tensor's slices come from."""

    def __init__(self, tensors: list[_Tensor]):
        self.unique: list[np.ndarray] = []
        self.names: list[str] = []
        self.copies: list[list[_Tensor]] = []  # every graph's tensor of each distinct one
        ids: dict[tuple, int] = {}
        for t in tensors:
            key = (t.array.dtype.str, t.array.shape, t.array.tobytes())
            if key not in ids:
                ids[key] = len(self.unique)
                self.unique.append(t.array)
                self.names.append(t.proto.name)
                self.copies.append([])
            self.copies[ids[key]].append(t)
        self.ids = ids
        self.by_rank: dict[tuple, list[int]] = defaultdict(list)  # (dtype, ndim) -> ids
        for k, a in enumerate(self.unique):
            self.by_rank[(a.dtype.str, a.ndim)].append(k)
        self._slices: dict[tuple[int, int], dict[bytes, list[int]]] = {}

    def same(self, a: np.ndarray) -> int | None:
        return self.ids.get((a.dtype.str, a.shape, a.tobytes()))

    def slices(self, k: int, axis: int) -> dict[bytes, list[int]]:
        if (k, axis) not in self._slices:
            table: dict[bytes, list[int]] = defaultdict(list)
            for j, s in enumerate(_rows(self.unique[k], axis)):
                table[s].append(j)
            self._slices[(k, axis)] = table
        return self._slices[(k, axis)]

    def find(self, t: _Tensor) -> tuple[int, int, np.ndarray] | None:
        """(widest tensor id, axis, its indices t keeps) or None. A tensor of the same name
        is tried first; slices that occur more than once in F take their first unused copy."""
        a = t.array
        for k in sorted(self.by_rank[(a.dtype.str, a.ndim)], key=lambda k: self.names[k] != t.proto.name):
            shape = self.unique[k].shape
            differ = [d for d in range(a.ndim) if shape[d] != a.shape[d]]
            if len(differ) != 1 or shape[differ[0]] < a.shape[differ[0]]:
                continue
            axis = differ[0]
            table, used, kept = self.slices(k, axis), set(), []
            for s in _rows(a, axis):
                j = next((j for j in table.get(s, ()) if j not in used), None)
                if j is None:
                    break
                used.add(j)
                kept.append(j)
            else:
                return k, axis, np.asarray(kept, np.int64)
        return None


def _rows(a: np.ndarray, axis: int) -> list[bytes]:
    """The bytes of each slice of ``a`` along ``axis``."""
    moved = np.ascontiguousarray(np.moveaxis(a, axis, 0))
    return [moved[j].tobytes() for j in range(moved.shape[0])]


def _order(family: _Family) -> bool:
    """F's slices in store order: each width's kept slices after the narrower widths'. False
    where the widths' slices are not nested (no order makes all of them prefixes)."""
    order: list[int] = []
    placed: set[int] = set()
    for _, kept in sorted(family.members, key=lambda m: len(m[1])):
        if not placed <= set(kept.tolist()):
            return False
        for j in kept.tolist():
            if j not in placed:
                placed.add(j)
                order.append(j)
    order += [j for j in range(family.full.shape[family.axis]) if j not in placed]
    family.order = np.asarray(order, np.int64)
    return True


def _stored(family: _Family) -> bytes:
    moved = np.moveaxis(family.full, family.axis, 0)
    return np.ascontiguousarray(moved[family.order]).tobytes()


def _read_prefix(t: _Tensor, family: _Family, kept: np.ndarray, stored: bytes) -> bool:
    """Point ``t`` at the first len(kept) slices of the store layout; True where it needs a
    Gather/Transpose restore. Raises if the restored tensor would differ from ``t``."""
    position = np.empty_like(family.order)
    position[family.order] = np.arange(family.order.size)
    gather = position[kept]  # where each slice t keeps sits in the store
    n = len(kept)
    moved_shape = (n, *np.delete(family.full.shape, family.axis))
    prefix = np.frombuffer(stored, family.full.dtype, count=int(np.prod(moved_shape))).reshape(moved_shape)
    identity = bool(np.array_equal(gather, np.arange(n)))
    perm = [*range(1, family.axis + 1), 0, *range(family.axis + 1, family.full.ndim)]
    restored = np.transpose(prefix if identity else prefix[gather], perm)
    if restored.shape != t.array.shape or restored.tobytes() != t.array.tobytes():
        raise AssertionError(f"the store layout does not restore {t.proto.name}; this is a bug in edgeseq")
    if identity and family.axis == 0:
        t.proto.CopyFrom(numpy_helper.from_array(prefix, t.proto.name))
        return False
    name = t.proto.name
    t.proto.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(prefix), f"{name}.stored"))
    nodes, value = [], f"{name}.stored"
    if not identity:
        order = numpy_helper.from_array(gather, f"{name}.order")
        t.graph.initializer.append(order)
        nodes.append(helper.make_node("Gather", [value, order.name], [f"{name}.gathered"], name=f"{name}.gather", axis=0))
        value = f"{name}.gathered"
    if family.axis != 0:
        nodes.append(helper.make_node("Transpose", [value], [name], name=f"{name}.transpose", perm=perm))
    else:
        nodes[-1].output[0] = name
    for node in reversed(nodes):
        t.graph.node.insert(0, node)
    return True
