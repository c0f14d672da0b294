"""What cutting a model that was never trained nested costs: the same architecture and
recipe trained twice, once at every nested width each step (edgeseq's recipe) and once at
full width only (as Granite, Nemotron-H, Falcon-H1 and other non-nested checkpoints are),
then both evaluated at every width on the held-out sample (bits per byte).

    python3 scripts/untrained_width_cost.py [--model mamba2-tiny] [--steps 400]
        [--max-seconds 150] [--run nested|plain|both|table] [--out scripts/results/untrained_width_cost.json]

Each run writes its metadata beside --out (``<out stem>.<run>.json``); the table is printed
once both exist. Meant for the GPU machine (``--device cuda``); any device works.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeseq.train import TrainConfig, train
from edgeseq.zoo import BUILTIN

RUNS = {"nested": (), "plain": (1.0,)}  # training widths: () = every nested width of the config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mamba2-tiny", choices=sorted(BUILTIN))
    ap.add_argument("--steps", type=int, default=400, help="the schedule's steps (both runs)")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop a run after this long (0: never)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--run", choices=[*RUNS, "both", "table"], default="both", help="table: train nothing, print")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "untrained_width_cost.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in {"both": list(RUNS), "table": []}.get(args.run, [args.run]):
        tc = TrainConfig(model=args.model, steps=args.steps, batch=args.batch, widths=RUNS[name],
                         max_seconds=args.max_seconds)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            meta = train(tc, Path(tmp), device=args.device)
        out.with_suffix(f".{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    runs = {name: out.with_suffix(f".{name}.json") for name in RUNS}
    if not all(p.is_file() for p in runs.values()):
        return 0
    metas = {name: json.loads(p.read_text()) for name, p in runs.items()}
    widths = sorted(metas["nested"]["eval"], key=float, reverse=True)
    table = Table(title=f"{args.model}: held-out bits per byte by width (lower is better)")
    for column in ("width", "trained nested", "trained at 1 only", "cost of not nesting"):
        table.add_column(column, justify="right")
    rows = []
    for w in widths:
        nested, plain = (float(metas[n]["eval"][w]["heldout_bpb"]) for n in RUNS)
        rows.append({"width": w, "nested_bpb": nested, "plain_bpb": plain})
        table.add_row(w, f"{nested:.3f}", f"{plain:.3f}", f"{plain - nested:+.3f}")
    Console().print(table)
    steps = {n: metas[n]["steps"] for n in RUNS}
    out.write_text(json.dumps({"model": args.model, "steps": steps, "device": metas["nested"]["device"],
                               "rows": rows, "runs": metas}, indent=1) + "\n")  # fmt: skip
    print(f"steps: {steps}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
