"""Bundle bytes against the model's weight bytes: the shipped models at widths 1, 1/2 and 1/4
in every precision, and a 130M-class Mamba2 (hidden 768, 24 layers, vocab 50288; random
weights: size does not depend on training) in fp32 and int8.

For each configuration it exports a bundle for x86-64-cpu (portable and opset27 flavors;
no validation, which does not change a byte) and reports:

    weights   the model's parameters at fp32, a tied embedding counted once
    before    what the same graphs took when every graph carried its own weights: the sum
              of the step and prefill graphs of both flavors, each with its weights inline
              and the tied embedding stored beside the head (the layout before weights.data)
    bundle    every file of the bundle now (graphs of both flavors, the onnxruntime-genai
              decoder, weights.data, manifest, tokenizer, README)

    python scripts/bundle_sizes.py [--skip-130m | --only-130m] [--out scripts/results/bundle_sizes.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from edgeseq.deploy.bundle import WEIGHTS_FILE, read_manifest
from edgeseq.deploy.pipeline import ExportRequest, export_bundle, quant_options
from edgeseq.export.graphs import SPLIT_K, build_graph
from edgeseq.export.quantize import quantize_graph
from edgeseq.extract import extract
from edgeseq.families import save_checkpoint
from edgeseq.targets import get_target
from edgeseq.width import WidthSpec
from edgeseq.zoo import load_model

TARGET = "x86-64-cpu"
MiB = 2**20


def weight_bytes(model) -> int:
    return sum(t.numel() * 4 for t in model.state_dict().values())  # a tied head is not a second entry


def before_bytes(model, flavors: list[str], precision: str) -> int:
    """The graphs as bundles stored them before: each graph with all its weights inline."""
    options = quant_options(get_target(TARGET), precision)
    total = 0
    for flavor in flavors:
        for kind in ("step", "prefill"):
            proto = build_graph(model, kind, flavor, split_k=SPLIT_K if precision == "fp32" else None)
            total += (quantize_graph(proto, options) if precision != "fp32" else proto).ByteSize()
    return total


def measure(name: str, model_arg: str, width: str, precision: str, root: Path) -> dict:
    out = root / f"{name}-{width.replace('/', '_')}-{precision}"
    export_bundle(ExportRequest(model_arg, TARGET, WidthSpec.parse(width), out, precision=precision, validate=False))
    manifest = read_manifest(out)
    full, _ = load_model(model_arg)
    sub = extract(full, WidthSpec.parse(width)).float().eval()
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    row = {
        "model": name, "width": width, "precision": precision, "flavors": manifest["flavors"],
        "weights": weight_bytes(sub), "before": before_bytes(sub, manifest["flavors"], precision),
        "bundle": sum(files.values()), "weights_data": files.get(WEIGHTS_FILE, 0),
        "graphs": {k: v for k, v in files.items() if k.endswith(".onnx")},
        "genai": manifest["genai"].get("decoder") or manifest["genai"].get("why_not"),
    }  # fmt: skip
    row["bundle_over_weights"] = row["bundle"] / row["weights"]
    row["before_over_weights"] = row["before"] / row["weights"]
    print(f"{name} w{width} {precision}: bundle {row['bundle'] / MiB:.1f} MiB ({row['bundle_over_weights']:.3f}x "
          f"weights), before {row['before'] / MiB:.1f} MiB", flush=True)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-130m", action="store_true")
    ap.add_argument("--only-130m", action="store_true", help="measure the 130M rows and keep the others from --out")
    ap.add_argument("--out", type=Path, default=Path("scripts/results/bundle_sizes.json"))
    args = ap.parse_args()
    rows = []
    if args.only_130m:
        rows = [r for r in json.loads(args.out.read_text())["rows"] if "130m" not in r["model"]]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in () if args.only_130m else ("mamba2-tiny", "hybrid-tiny"):
            for width in ("1", "1/2", "1/4"):
                for precision in ("fp32", "fp16", "int8", "int4"):
                    rows.append(measure(name, name, width, precision, root))
        if not args.skip_130m:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_decode import mamba2_130m

            save_checkpoint(mamba2_130m().to(torch.float32), root / "mamba2-130m")
            for precision in ("fp32", "int8"):
                rows.append(measure("mamba2-130m (random)", str(root / "mamba2-130m"), "1", precision, root))
    table = Table(title=f"bundle bytes against weight bytes ({TARGET}: portable + opset27 flavors)")
    for col in ("model", "width", "precision", "weights MiB", "before MiB", "before / weights", "bundle MiB",
                "bundle / weights"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("model", "precision") else "right")
    for r in rows:
        table.add_row(r["model"], r["width"], r["precision"], f"{r['weights'] / MiB:.1f}", f"{r['before'] / MiB:.1f}",
                      f"{r['before_over_weights']:.2f}x", f"{r['bundle'] / MiB:.1f}", f"{r['bundle_over_weights']:.3f}x")  # fmt: skip
    Console(width=140).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"target": TARGET, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
