"""Graphs a target's runtime can run: the quantization form it parses, and a one-line
refusal, before any work, of a precision or flavor it cannot parse.

The decisions use what each piece declares it adds to the portable flavor's basic ops
(``QuantOptions.introduces``, ``Flavor.ops``) against what the target's runtime parses
(``edgeseq.targets.ops``); ``check_graphs`` then holds every node of the graphs built to
the same runtime before anything is written.

    int4 on onnxruntime: MatMulNBits (contrib ops, fastest on the CPU)
    int4 on TensorRT:    block-wise DequantizeLinear -> MatMul (standard ops)
    int8 on TensorRT:    its profile's preset must be qdq-weight-only (the default there)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from edgeseq.errors import EdgeseqError
from edgeseq.export.flavors import FLAVORS
from edgeseq.export.quantize import INT4_FORMS, QuantOptions
from edgeseq.targets.ops import RuntimeOps, runtime_ops, unsupported_ops
from edgeseq.targets.profile import Target

if TYPE_CHECKING:
    import onnx


class UnsupportedOpsError(EdgeseqError):
    """The target's runtime cannot parse the graphs asked for."""


def check_target(target: Target, precision: str | None, flavors: list[str], block_size: int = 32) -> None:
    """Refuse, before any work, a flavor or a precision (None: not chosen yet) that
    ``target``'s runtime cannot parse."""
    check_flavors(target, flavors)
    if precision is not None:
        quant_options(target, precision, block_size)


def quant_options(target: Target, precision: str, block_size: int = 32) -> QuantOptions:
    """The quantization of ``precision`` that ``target``'s runtime parses: the first int4
    form it reads, the profile's int8 preset. Refuses, naming what to use instead."""
    runtime = runtime_ops(target)
    forms = _forms(target, precision, block_size)
    if chosen := _parsed(runtime, forms):
        return chosen
    lacking = sorted({op for form in forms for op in _lacking(runtime, form.introduces())})
    raise UnsupportedOpsError(
        f"{_runs(target)} cannot parse {precision} graphs ({', '.join(lacking)}); {_instead(target, runtime, precision)}"
    )


def check_flavors(target: Target, flavors: list[str]) -> None:
    """Refuse a flavor whose own ops ``target``'s runtime cannot parse."""
    runtime = runtime_ops(target)
    for flavor in flavors:
        if lacking := _lacking(runtime, FLAVORS[flavor].ops):
            fine = [f for f in FLAVORS if not _lacking(runtime, FLAVORS[f].ops)]
            raise UnsupportedOpsError(
                f"{_runs(target)} cannot parse the {flavor} graphs ({', '.join(lacking)}); "
                f"use {' or '.join(f'--flavor {f}' for f in fine)}"
            )


def check_graphs(target: Target, flavor: str, graphs: dict[str, onnx.ModelProto]) -> None:
    """Every node of every graph about to be written, held to ``target``'s runtime."""
    runtime = runtime_ops(target)
    for kind, graph in graphs.items():
        if problems := unsupported_ops(graph, runtime):
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UnsupportedOpsError(
                f"the {flavor} {kind} graph for {target.name} holds what {runtime.runtime} cannot parse: "
                f"{problems[0]}{more}; nothing was written"
            )


def _lacking(runtime: RuntimeOps, ops) -> list[str]:
    return [
        f"{domain or 'ai.onnx'} {op}-{version}" for domain, op, version in ops if runtime.lacks(domain, op, version)
    ]


def _runs(target: Target) -> str:
    return f"{target.name} runs {target.runtime} {target.min_runtime_version}+, which"


def _instead(target: Target, runtime: RuntimeOps, precision: str) -> str:
    """The other precisions the target runs that its runtime parses, and the int8 preset
    that would make int8 parse."""
    fine = [p for p in target.precisions if p != precision and _parsed(runtime, _forms(target, p))]
    advice = [f"use {' or '.join(f'--quant {p}' for p in fine)}"] if fine else []
    qdq = replace(target, int8_preset="qdq-weight-only")
    if precision == "int8" and _parsed(runtime, _forms(qdq, precision)):
        advice.insert(0, 'set runtime.int8_preset = "qdq-weight-only" in its profile')
    return ", or ".join(advice) or f"use another target than {target.name}"


def _forms(target: Target, precision: str, block_size: int = 32) -> list[QuantOptions]:
    """The ways to make ``precision`` for ``target``, in preference order."""
    options = QuantOptions(precision, int8_preset=target.int8_preset, block_size=block_size)
    return [replace(options, int4_form=form) for form in INT4_FORMS] if precision == "int4" else [options]


def _parsed(runtime: RuntimeOps, forms: list[QuantOptions]) -> QuantOptions | None:
    return next((form for form in forms if not _lacking(runtime, form.introduces())), None)
