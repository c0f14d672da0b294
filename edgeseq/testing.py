"""Parity assertions for users' CI: does a deployed graph still match the reference?

    from edgeseq.testing import assert_bundle_parity

    def test_bundle_matches_reference():
        assert_bundle_parity("out/mamba2-tiny-fp16", report="out/parity.json")

Each raises ``AssertionError`` whose message lists every failure in one line each, and
returns the result when parity holds. ``assert_bundle_parity`` runs exactly what
``edgeseq validate BUNDLE`` runs; ``assert_parity`` compares any two runners you built.
Built on ``edgeseq.validate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseq.export.spec import GraphIO, Tolerance
from edgeseq.validate.compare import DECODE_STEPS, LONG_STEPS, Runner, compare
from edgeseq.validate.golden import Golden, compare_golden
from edgeseq.validate.report import plot_drift, write_report
from edgeseq.validate.results import CompareResult


def assert_parity(
    reference_runner: Runner,
    candidate_runner: Runner,
    io: GraphIO | None = None,
    precision: str | Tolerance = "fp32",
    *,
    steps: int = DECODE_STEPS,
    long_steps: int = LONG_STEPS,
    prompts: Sequence[np.ndarray] | None = None,
    seed: int = 0,
    tokens: np.ndarray | None = None,
    prefill: tuple[Runner, Runner, GraphIO] | None = None,
    state_rel_l2: float | None = None,
    report: str | Path | None = None,
    plot: str | Path | None = None,
) -> CompareResult:
    """Compare two active runners (``edgeseq.validate.compare``: prompts, ``steps`` decode
    steps, a ``long_steps`` stream) against ``TOLERANCES[precision]``. ``io`` defaults to
    ``reference_runner.io``; ``report`` and ``plot`` paths, when given, receive the JSON
    report and the drift PNG, pass or fail."""
    result = compare(
        reference_runner, candidate_runner, io, tolerance=precision, prompts=prompts, steps=steps,
        long_steps=long_steps, seed=seed, tokens=tokens, prefill=prefill, state_rel_l2=state_rel_l2,
    )  # fmt: skip
    _record_and_judge(result, report, plot)
    return result


def assert_golden_parity(
    candidate_runner: Runner,
    golden: Golden | str | Path,
    precision: str | Tolerance = "fp32",
    *,
    report: str | Path | None = None,
) -> CompareResult:
    """Compare a candidate with a golden file, without torch."""
    result = compare_golden(candidate_runner, golden, tolerance=precision)
    _record_and_judge(result, report, None)
    return result


def assert_bundle_parity(
    bundle_dir: str | Path,
    *,
    flavor: str | None = None,
    steps: int = DECODE_STEPS,
    long_steps: int = LONG_STEPS,
    heldout: tuple[int, int] | None = (16, 512),
    device: str = "auto",
    report: str | Path | None = None,
    plot: str | Path | None = None,
) -> dict:
    """What ``edgeseq validate BUNDLE`` checks, as an assertion: every flavor that runs
    here (or ``flavor``), its step and prefill graphs, against the PyTorch reference
    rebuilt from the source model (``edgeseq.deploy.validation.run_validation``; every
    width of an elastic bundle and its switching stream too), with the
    held-out gate (``heldout`` = streams x tokens; None skips it). ``report`` and ``plot``
    receive one file per flavor (prefixed with its name when there are several). Returns
    the outcome ``edgeseq validate --json`` prints; a bundle none of whose flavors runs
    here fails too."""
    from edgeseq.deploy.switching import validate_elastic
    from edgeseq.deploy.validation import run_validation

    outcome = run_validation(bundle_dir, flavor, steps, long_steps, device, report, plot, None, None, heldout=heldout)
    validate_elastic(outcome, Path(bundle_dir), flavor, steps, long_steps, device, heldout=heldout)
    lines = [f"{name}: {entry['summary']}" for name, entry in outcome["flavors"].items() if not entry["passed"]]
    if not outcome["flavors"]:
        lines.append(f"no flavor of {bundle_dir} runs here: {outcome['not_run']}")
    if lines:
        where = f"\nreport: {report}" if report is not None else ""
        raise AssertionError(f"FAIL: {bundle_dir} at {outcome['precision']}\n" + "\n".join(lines) + where)
    return outcome


def _record_and_judge(result: CompareResult, report: str | Path | None, plot: str | Path | None) -> None:
    if report is not None:
        write_report(result, report)
    if plot is not None and "long_stream" in result.phases:
        plot_drift(result, plot)
    if not result:
        where = f"\nreport: {report}" if report is not None else ""
        raise AssertionError(result.summary() + where)


def damage_graph(bundle_dir: str | Path, flavor: str, kind: str, seed: int | None = None,
                 weight: str | None = None) -> str:  # fmt: skip
    """Damage one weight of a bundle's graph in place, as a buggy exporter would, and
    re-sign the manifest so that only validation can notice: the rows of one weight
    initializer (at least 2-D, any dtype: float, int8, packed int4) are shuffled, e.g. a
    wrong layout. ``weight`` names it, else one is drawn from ``seed``. Returns its name.
    For proving, in a CI, that validation fails on a damaged bundle."""
    import onnx
    from onnx import numpy_helper

    from edgeseq.deploy.bundle import graph_path, read_manifest, write_graph, write_manifest

    root = Path(bundle_dir)
    manifest = read_manifest(root)
    path = graph_path(root, manifest, flavor, kind)
    proto = onnx.load(str(path))
    weights = damageable_weights(proto)
    rng = np.random.default_rng(seed)
    init = weights[weight] if weight is not None else weights[sorted(weights)[rng.integers(len(weights))]]
    array = numpy_helper.to_array(init)
    order = rng.permutation(array.shape[0])
    while (order == np.arange(array.shape[0])).all():
        order = rng.permutation(array.shape[0])
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array[order]), init.name))
    write_graph(path, proto)
    write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})
    return init.name


def damageable_weights(proto) -> dict:
    """The initializers ``damage_graph`` may damage: weights, i.e. float, int8 or packed
    int4 tensors of at least 2-D with at least two rows and 64 values (matrices,
    embeddings, convolution kernels, quantized blocks); not boolean masks or index
    constants, which are the graph's structure rather than the model's weights."""
    from onnx import TensorProto

    kinds = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
             TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}  # fmt: skip
    return {t.name: t for t in proto.graph.initializer
            if t.data_type in kinds and len(t.dims) >= 2 and t.dims[0] >= 2 and int(np.prod(t.dims)) >= 64}  # fmt: skip
