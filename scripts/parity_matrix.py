"""Parity of exported graphs against the PyTorch reference: both shipped models at widths
1, 1/2 and 1/4, portable and opset27 graphs in onnxruntime (CPU EP), the reference on CUDA
when there is a GPU (``--device cpu`` keeps it on the CPU). Each cell is a full
`edgeseq export` (256 decode steps, a 4096-step drift stream judged against fp64, 4
held-out prompts). Prints a table, writes JSON and keeps one bundle's validation reports.

    python3 scripts/parity_matrix.py --out DIR [--jobs 6] [--steps 256] [--long-steps 4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

from edgeseq.choices import DEVICES

MODELS, WIDTHS = ("mamba2-tiny", "hybrid-tiny"), ("1", "0.5", "0.25")


def cell(args) -> dict:
    model, width, flavor, steps, long_steps, work, threads, device = args
    import torch

    from edgeseq.deploy.pipeline import ExportRequest, export_bundle

    torch.set_num_threads(threads)  # the reference's threads, like onnxruntime's: jobs share the cores
    from edgeseq.width import WidthSpec

    out = Path(work) / (f"{model}-w{width}" + (f"-{flavor}" if flavor else ""))
    if (out / "manifest.json").is_file():  # a finished cell of an interrupted run
        manifest = json.loads((out / "manifest.json").read_text())
        return _row(model, width, out, manifest, None)
    t0 = time.time()
    req = ExportRequest(model, "x86-64-cpu", WidthSpec.parse(width), out, flavor, steps=steps, long_steps=long_steps,
                        overwrite=True, threads=threads, reference_device=device)
    try:
        manifest = export_bundle(req)
    except Exception as e:  # a failed cell is a row of the table, not a crash of the matrix
        return {"model": model, "width": width, "error": str(e)[:300]}
    return _row(model, width, out, manifest, round(time.time() - t0, 1))


def _row(model: str, width: str, out: Path, manifest: dict, seconds) -> dict:
    row = {"model": model, "width": width, "seconds": seconds, "flavors": {}}
    for flavor in manifest["validation"]["ran"]:
        report = json.loads((out / "validation" / f"{flavor}.json").read_text())
        row["flavors"][flavor] = summarize(report)
    return row


def summarize(report: dict) -> dict:
    out = {"passed": report["passed"], "reference": report["runners"]["reference"]["device"]}
    for phase, res in report["phases"].items():
        logits = res["outputs"]["logits"]
        out[phase] = {"max_abs": logits["max_abs"], "top1": logits.get("top1_agreement"), "kl": logits.get("kl"),
                      "calls": logits["calls"]}
        if res.get("oracle_drift"):  # the long stream's distances from the fp64 run
            drift = res["oracle_drift"]
            out[phase] |= {"candidate_vs_fp64": drift["candidate_max"], "reference_vs_fp64": drift["reference_max"],
                           "ratio": drift["ratio"], "limit": drift["limit"], "within": drift["within"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/edgeseq_parity")
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--long-steps", type=int, default=4096)
    ap.add_argument("--device", default="auto", choices=DEVICES, help="where the reference runs")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list (default: both shipped models)")
    ap.add_argument("--split-flavors", action="store_true", help="a job per flavor (more, shorter jobs)")
    args = ap.parse_args()
    flavors = ("portable", "opset27") if args.split_flavors else (None,)  # the x86 target's flavors
    cells = [(m, w, f) for m in args.models.split(",") for w in WIDTHS for f in flavors]
    jobs = [(*c, args.steps, args.long_steps, args.work, args.threads, args.device) for c in cells]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(cell, jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity_matrix.json").write_text(json.dumps(rows, indent=1) + "\n")
    keep = Path(args.work) / "mamba2-tiny-w0.5"
    for name in ("validation/portable.json", "validation/portable_drift.png", "manifest.json"):
        if (keep / name).is_file():
            shutil.copy(keep / name, out / name.replace("/", "_"))
    print(f"{'model':<12} {'width':>5} {'flavor':<9} {'pass':<5} {'prefill':>9} {'decode':>9} {'top1':>6} "
          f"{'drift':>9} {'cand-fp64':>9} {'ref-fp64':>9} {'ratio':>6} reference")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {r['width']:>5} ERROR {r['error']}")
            continue
        for f, s in r["flavors"].items():
            ls = s["long_stream"]
            print(f"{r['model']:<12} {r['width']:>5} {f:<9} {s['passed']!s:<5} {s['prefill']['max_abs']:>9.2e} "
                  f"{s['decode']['max_abs']:>9.2e} {s['decode']['top1']:>6.3f} {ls['max_abs']:>9.2e} "
                  f"{ls.get('candidate_vs_fp64', float('nan')):>9.2e} {ls.get('reference_vs_fp64', float('nan')):>9.2e} "
                  f"{ls.get('ratio', float('nan')):>6.2f} {s['reference']}")


if __name__ == "__main__":
    main()
