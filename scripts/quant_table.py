"""The width x precision table of a model, every number from edgeseq's own commands.

For each width and precision: `edgeseq export --target x86 --flavor portable --width W
--quant P` (validation included: 256 decode steps, a 4096-step stream, the held-out gate
on 16 x 512 held-out bytes), then `edgeseq bench --runtime onnxruntime:portable` for the
decode speed. Prints a table and writes JSON.

    python3 scripts/quant_table.py --out scripts/results/quant_table [--widths 1,0.5,0.25]
        [--jobs 2] [--bench-threads 2] [--skip-export]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgeseq.choices import DEVICES, PRECISIONS
from edgeseq.deploy.bundle import WEIGHTS_FILE


def edgeseq(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "edgeseq.cli", *args, "--json"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout)


def export_cell(model: str, width: str, precision: str, work: Path, device: str, validate: bool = True) -> dict:
    out = work / f"{model}-w{width}-{precision}"
    if (out / "manifest.json").is_file():
        return {"output": str(out), "manifest": json.loads((out / "manifest.json").read_text())}
    return edgeseq("export", "--model", model, "--target", "x86", "--flavor", "portable", "--width", width,
                   "--quant", precision, "-o", str(out), "--overwrite", "--device", device,
                   *([] if validate else ["--no-validate"]))


def row_of(model: str, width: str, precision: str, doc: dict, bench: dict | None, validated: dict | None = None) -> dict:
    row = {"model": model, "width": width, "precision": precision}
    if "error" in doc:
        return row | {"error": doc["error"]}
    manifest, out = doc["manifest"], Path(doc["output"])
    if validated is not None:  # validation figures from another run of the same export (same graph bytes)
        files = {k: v for k, v in manifest["files"].items() if k.endswith(".onnx") or k == WEIGHTS_FILE}
        size = sum((out / rel).stat().st_size for rel in files)
        if files != validated.get("graph_sha256", files) or size != validated["graph_bytes"]:
            return row | {"error": "graphs differ from the validated run's; the export is not deterministic here"}
        row |= {k: v for k, v in validated.items() if k not in ("bundle_bytes", "graph_bytes")}
        row |= {"bundle_bytes": validated["bundle_bytes"], "graph_bytes": validated["graph_bytes"]}
        return _bench_columns(row, bench)
    ran = manifest["validation"]["ran"]["portable"]
    heldout = ran["heldout"]
    row |= {
        "passed": ran["passed"],
        "bundle_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "graph_bytes": sum((out / rel).stat().st_size for rel in manifest["files"]
                           if rel.endswith(".onnx") or rel == WEIGHTS_FILE),  # graphs and the weights they share
        "heldout_bpb": heldout.get("candidate_bpb"),
        "reference_bpb": heldout.get("reference_bpb"),
        "bpb_delta": heldout.get("delta"),
        "kl": heldout.get("kl"),
        "top1": heldout.get("top1_agreement"),
        "heldout_tokens": heldout.get("tokens"),
        "quantization": manifest["quantization"],
        "reference": ran.get("reference"),
        "graph_sha256": {k: v for k, v in manifest["files"].items() if k.endswith(".onnx") or k == WEIGHTS_FILE},
    }
    return _bench_columns(row, bench)


def _bench_columns(row: dict, bench: dict | None) -> dict:
    if bench and "rows" in bench:
        (r,) = bench["rows"]
        row |= {"decode_ms": r["decode_ms"], "tokens_per_s": 1e3 / r["decode_ms"], "bench_threads": bench["threads"],
                "prefill_tokens_per_s": r["prefill_tokens_per_s"], "peak_rss_bytes": r["peak_rss_bytes"]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mamba2-tiny")
    ap.add_argument("--widths", default="1,0.5,0.25")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/edgeseq_quant_table")
    ap.add_argument("--jobs", type=int, default=1, help="exports at once (validation already keeps two cores busy)")
    ap.add_argument("--bench-threads", type=int, default=2)
    ap.add_argument("--bench-steps", type=int, default=400)
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--device", default="cpu", choices=DEVICES, help="where the reference runs")
    ap.add_argument("--validated", help="JSON of an earlier run (e.g. a faster machine): take its validation "
                    "figures, export here without validating, check the graphs are byte-identical, bench here")
    args = ap.parse_args()
    validated = None
    if args.validated:
        validated = {(r["width"], r["precision"]): r for r in json.loads(Path(args.validated).read_text())}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cells = [(w, p) for w in args.widths.split(",") for p in PRECISIONS]
    with ThreadPoolExecutor(args.jobs) as pool:  # each export is its own process
        docs = list(pool.map(lambda c: export_cell(args.model, *c, work, args.device, validated is None), cells))
    rows = []
    for (width, precision), doc in zip(cells, docs):  # benchmarks one at a time: nothing else on the cores
        bench = None
        if "error" not in doc and not args.no_bench:
            bench = edgeseq("bench", doc["output"], "--runtime", "onnxruntime:portable", "--threads",
                            str(args.bench_threads), "--steps", str(args.bench_steps), "--prompt-len", "256")
        rows.append(row_of(args.model, width, precision, doc, bench,
                           validated[(width, precision)] if validated is not None else None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    fp32 = {r["width"]: r for r in rows if r["precision"] == "fp32" and "error" not in r}
    print(f"{'width':>5} {'prec':<5} {'pass':<5} {'bundle MiB':>10} {'x fp32':>6} {'bits/byte':>9} {'delta':>8} "
          f"{'KL':>9} {'top-1':>6} {'tok/s':>7} {'x fp32':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['width']:>5} {r['precision']:<5} ERROR {r['error']}")
            continue
        base = fp32.get(r["width"], r)
        speed = r.get("tokens_per_s", float("nan"))
        print(f"{r['width']:>5} {r['precision']:<5} {r['passed']!s:<5} {r['bundle_bytes'] / 2**20:>10.2f} "
              f"{r['bundle_bytes'] / base['bundle_bytes']:>6.2f} {r['heldout_bpb']:>9.4f} {r['bpb_delta']:>+8.4f} "
              f"{r['kl']:>9.2e} {r['top1']:>6.4f} {speed:>7.0f} {speed / base.get('tokens_per_s', float('nan')):>6.2f}")


if __name__ == "__main__":
    main()
