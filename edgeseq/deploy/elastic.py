"""Elastic bundles at export: which widths, and what the manifest says of each.

An elastic bundle is a bundle of its widest width (manifest, graphs, validation as any
bundle) whose ``elastic`` entry lists every width, widest first, and for each narrower one
its ``width``, ``layer_widths``, ``config``, ``io``, ``graphs`` and ``validation``
(``edgeseq.deploy.bundle.width_view`` reads the manifest as that width's). The graphs of
every width read one weight store (``edgeseq.export.elastic``).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import graph_io
from edgeseq.width import WidthSpec, exact_width, full, resolve


def elastic_widths(config, asked: tuple[WidthSpec, ...]) -> list[WidthSpec]:
    """An elastic bundle's widths, widest first: ``asked``, else (empty) the checkpoint's
    trained widths. Each must be one the model honours, and each narrower than the last in
    every layer (nested)."""
    specs = list(asked) or [WidthSpec.uniform(w) for w in config.nested_widths or ()]
    if len(specs) < 2:
        raise EdgeseqError("an elastic bundle needs at least two widths and this checkpoint declares fewer trained "
                           "ones; give them with --widths-set 1,1/2,1/4")  # fmt: skip
    resolved = {}
    for spec in specs:
        resolved.setdefault(tuple(resolve(config, spec)), spec)  # one entry per distinct width
    order = sorted(resolved, key=lambda ws: -sum(sum(w.to_dict().values()) for w in ws))
    for wide, narrow in pairwise(order):
        if any(n[p] > w[p] for w, n, spec in zip(wide, narrow, config.layers) for p in spec.parts):
            raise EdgeseqError(f"widths {resolved[wide]} and {resolved[narrow]} are not nested (each layer of the "
                               "narrower must keep no more than the wider); choose nested widths")  # fmt: skip
    if len(order) < 2:
        raise EdgeseqError("the widths given keep the same units; give at least two different widths")
    return [resolved[ws] for ws in order]


def width_label(config, spec: WidthSpec) -> str:
    """A width as bundles name it: "1/2", or "7/24" where 0.3 was asked."""
    return exact_width(config, spec).split(" = ")[0]


def elastic_entry(widest: str, narrower: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``elastic`` entry: the widths and, per narrower width (label ->
    extracted model), what its view of the manifest replaces; graphs and validation are
    added as they are written."""
    members = {
        w: {"width": w, "layer_widths": [x.to_dict() for x in full(m.config)], "config": m.config.to_dict(),
            "io": {k: graph_io(m.config, k).to_dict() for k in ("step", "prefill")}}
        for w, m in narrower.items()
    }  # fmt: skip
    return {"widths": [widest, *narrower], "members": members}


def shared_options(options, narrowest, flavor: str):
    """Quantization options that give every width the same blocks: int8 picks its block per
    graph (the largest that divides every matrix), so an elastic bundle takes the narrowest
    width's for all (it divides the wider widths' matrices too), and the store shares them."""
    from dataclasses import replace

    from edgeseq.export.graphs import build_graph
    from edgeseq.export.quantize import int8_block_size

    if options.precision != "int8" or options.int8_preset == "qdq-weight-only":
        return options
    return replace(options, int8_block_size=int8_block_size(build_graph(narrowest, "prefill", flavor), options.int8_block_size))
