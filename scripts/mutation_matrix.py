"""Damage every weight of every graph of bundles of every precision, one at a time, and
count how often validation fails (it must, every time).

    python scripts/mutation_matrix.py --out scripts/results/mutation_matrix.json
    python scripts/mutation_matrix.py --models mamba2-tiny --precisions int4 --workers 2

For each (model, precision) a bundle is exported at width 1/4 for x86 (flavors portable
and opset27, no validation); the undamaged bundle is validated first (the control: it
must pass), then for each flavor, graph (step, prefill) and weight that
``edgeseq.testing.damage_graph`` may damage, a copy with that weight's rows shuffled is
validated with the settings of tests/edgeseq/validate/test_mutation.py. Prints a table
and writes JSON: per cell the weights damaged, how many failed validation, and the names
of any that passed.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

SETTINGS = {"steps": 32, "long_steps": 64, "prompts": 2, "heldout": (8, 128)}


def _export(model: str, precision: str, root: Path) -> Path:
    from edgeseq.deploy.pipeline import ExportRequest, export_bundle
    from edgeseq.width import WidthSpec

    path = root / f"{model}-{precision}"
    export_bundle(ExportRequest(model, "x86", WidthSpec.parse("1/4"), path, precision=precision, validate=False))
    return path


def _validate(path: Path, flavor: str) -> tuple[bool, str]:
    from edgeseq.deploy.bundle import read_manifest
    from edgeseq.deploy.validation import reference_model, validate_flavor

    manifest = read_manifest(path)
    model, device = reference_model(path, manifest, "cpu")
    s = SETTINGS
    verdict = validate_flavor(path, manifest, model, flavor, s["steps"], s["long_steps"], s["prompts"], device,
                              threads=1, heldout=s["heldout"])  # fmt: skip
    first = verdict.compare.failures[:1] or (verdict.heldout.failures()[:1] if verdict.heldout is not None else [])
    return bool(verdict), str(first[0]) if first else ""


def _one(job: tuple[str, str, str, str | None]) -> dict:
    """Validate ``source`` (weight None: the control) or a copy with one weight damaged."""
    from edgeseq.testing import damage_graph

    source, flavor, kind, weight = job
    if weight is None:
        passed, why = _validate(Path(source), flavor)
        return {"flavor": flavor, "kind": "control", "weight": None, "passed": passed, "why": why}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "b"
        shutil.copytree(source, copy)
        damage_graph(copy, flavor, kind, seed=0, weight=weight)
        passed, why = _validate(copy, flavor)
    return {"flavor": flavor, "kind": kind, "weight": weight, "passed": passed, "why": why}


def _jobs(path: Path, per_graph: int | None) -> list[tuple[str, str, str, str | None]]:
    import onnx

    from edgeseq.deploy.bundle import graph_path, read_manifest
    from edgeseq.deploy.runtimes import runnable_here
    from edgeseq.testing import damageable_weights

    manifest = read_manifest(path)
    jobs = []
    for flavor in (f for f in manifest["flavors"] if runnable_here(f)):
        jobs.append((str(path), flavor, "control", None))
        for kind in ("step", "prefill"):
            proto = onnx.load(str(graph_path(path, manifest, flavor, kind)))
            names = sorted(damageable_weights(proto))
            if per_graph is not None and per_graph < len(names):  # a sample, the same every run
                names = sorted(np.random.default_rng(len(names)).choice(names, per_graph, replace=False))
            jobs += [(str(path), flavor, kind, str(name)) for name in names]
    return jobs


@click.command()
@click.option("--models", default="mamba2-tiny,hybrid-tiny", show_default=True)
@click.option("--precisions", default="fp32,fp16,int8,int4", show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Processes validating at once.")
@click.option("--per-graph", type=int, default=None, help="Damage this many weights per graph (default: every one).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("scripts/results/mutation_matrix.json"),
              show_default=True)  # fmt: skip
def main(models: str, precisions: str, workers: int, per_graph: int | None, out: Path) -> None:
    console = Console()
    cells: dict[str, dict] = {}
    t0 = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")  # forked after torch's thread pools start, workers hang
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        for model in models.split(","):
            for precision in precisions.split(","):
                path = _export(model, precision, Path(tmp))
                results = list(pool.map(_one, _jobs(path, per_graph)))
                for flavor in sorted({r["flavor"] for r in results}):
                    rows = [r for r in results if r["flavor"] == flavor]
                    control = next(r for r in rows if r["kind"] == "control")
                    damaged = [r for r in rows if r["kind"] != "control"]
                    cells[f"{model}/{precision}/{flavor}"] = {
                        "control_passed": control["passed"], "control_why": control["why"],
                        **{kind: {"damaged": sum(r["kind"] == kind for r in damaged),
                                  "failed_validation": sum(r["kind"] == kind and not r["passed"] for r in damaged),
                                  "passed_anyway": [r["weight"] for r in damaged if r["kind"] == kind and r["passed"]]}
                           for kind in ("step", "prefill")},
                    }  # fmt: skip
                console.print(f"{model} {precision}: {time.perf_counter() - t0:.0f}s", highlight=False)
    table = Table("bundle / flavor", "control", "step: failed", "prefill: failed", title="one weight damaged")
    for name, c in cells.items():
        table.add_row(name, "pass" if c["control_passed"] else "FAIL",
                      f"{c['step']['failed_validation']}/{c['step']['damaged']}",
                      f"{c['prefill']['failed_validation']}/{c['prefill']['damaged']}")  # fmt: skip
    console.print(table)
    total = sum(c[k]["damaged"] for c in cells.values() for k in ("step", "prefill"))
    caught = sum(c[k]["failed_validation"] for c in cells.values() for k in ("step", "prefill"))
    controls = all(c["control_passed"] for c in cells.values())
    console.print(f"{caught}/{total} damaged graphs failed validation; controls {'all pass' if controls else 'FAIL'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"settings": SETTINGS, "per_graph": per_graph or "all", "width": "1/4", "target": "x86", "caught": caught, "damaged": total,
           "controls_pass": controls, "seconds": round(time.perf_counter() - t0), "cells": cells}  # fmt: skip
    out.write_text(json.dumps(doc, indent=1) + "\n")
    sys.exit(0 if controls and caught == total else 1)


if __name__ == "__main__":
    main()
