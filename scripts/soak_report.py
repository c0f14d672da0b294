"""The soak's records, checkpoints and verdicts (``scripts/soak.py``): one ``Block`` per
compared block, both states saved in one safetensors file, the bounds judged, the table."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
from rich.console import Console
from rich.table import Table
from soak_fp64 import VERIFY_TOLERANCE

from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import drift_limit
from edgeseq.runtimes.session import StreamingSession


@dataclass
class Block:
    index: int
    start: int
    steps: int
    max_abs: float  # max over the block's steps of max |graph logits - fp64 logits|
    mean_step_max: float  # mean over steps of the same per-step max
    worst_step: int  # stream position of the block's max
    max_state: float  # max |graph state| at the block's end
    state_vs_fp64: float  # max |graph state - fp64 state| at the block's end
    nonfinite: int  # NaN/Inf in the block's logits and in the state at its end
    rss_mib: float  # after the block
    graph_s: float  # seconds in the graph's steps
    fp64_s: float  # seconds the fp64 reference took over the block
    wait_s: float  # seconds the stream waited for it (all of fp64_s with --inline)
    wall_s: float  # seconds the block took in all (graph, fp64, comparison)
    segment: int  # which process ran it (0, then 1 after a resume, ...)


# ---- checkpoint -----------------------------------------------------------------------
def save_checkpoint(path: Path, session: StreamingSession, fp64_state: dict, meta: dict) -> None:
    """Both states and the run so far in one safetensors file, replaced atomically."""
    tensors = {"graph_state": np.frombuffer(session.save_state(), np.uint8)}
    tensors |= {f"fp64.{k}": v for k, v in fp64_state.items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, tmp, metadata={"soak": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, session: StreamingSession, graph_sha: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The run so far and the fp64 state (graph names); the graph's state goes into ``session``."""
    if not path.is_file():
        raise EdgeseqError(f"--resume: no checkpoint at {path}; run without --resume to start")
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["soak"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    if meta["graph_sha256"] != graph_sha:
        raise EdgeseqError(f"{path} was saved from another step graph; resume with the bundle it came from")
    session.load_state(tensors.pop("graph_state").tobytes())
    return meta, {k.removeprefix("fp64."): v for k, v in tensors.items()}


# ---- verdicts -------------------------------------------------------------------------
def summarize(blocks: list[Block], context: dict, verify: dict, args) -> dict:
    """The run's figures and one verdict per bound."""
    dist = np.array([b.max_abs for b in blocks])
    k = max(1, len(blocks) // 10)
    first, last, overall = float(dist[:k].max()), float(dist[-k:].max()), float(dist.max())
    limit = args.max_distance if args.max_distance is not None else drift_limit(context["fp32_reference_max"])
    graph_s = sum(b.graph_s for b in blocks)
    summary = {
        "steps": int(sum(b.steps for b in blocks)),
        "graph_steps_per_s": sum(b.steps for b in blocks) / graph_s if graph_s else None,
        "stream_steps_per_s": sum(b.steps for b in blocks) / sum(b.wall_s for b in blocks),  # fp64 and checks too
        "nonfinite": int(sum(b.nonfinite for b in blocks)),
        "rss_mib": rss_summary(blocks, args.warmup_blocks),
        "distance": {"first_10pct": first, "last_10pct": last, "overall": overall, "trend": last / first if first else None,
                     "blocks_per_10pct": k, "limit": limit, "max_state": max(b.max_state for b in blocks),
                     "state_vs_fp64": max(b.state_vs_fp64 for b in blocks)},
    }  # fmt: skip
    growth = max(s["growth"] for s in summary["rss_mib"])
    summary["verdicts"] = {
        "finite": [summary["nonfinite"] == 0, f"{summary['nonfinite']} non-finite values"],
        "rss": [None if args.inline else growth <= args.rss_growth_mib,  # --inline: the reference's churn, not judged
                f"RSS grew {growth:.2f} MiB after block {args.warmup_blocks} (bound {args.rss_growth_mib} MiB)"],
        "distance": [overall <= limit, f"max |graph - fp64| {overall:.3g} (limit {limit:.3g})"],
        "trend": [last <= args.max_trend * first, f"last 10% {last:.3g} vs first 10% {first:.3g} (bound {args.max_trend:g}x)"],
        "reference": [verify["max_abs"] <= VERIFY_TOLERANCE, f"fp64 chunked vs steps {verify['max_abs']:.2g}"],
    }  # fmt: skip
    return summary


def rss_summary(blocks: list[Block], warmup: int) -> list[dict]:
    """Per process segment: RSS after its first block, its max and last; the growth past
    RSS at the end of the first ``warmup`` blocks, and the slope after them (MiB per 100k
    steps, least squares): a leak grows steadily, a late one-off allocation does not."""
    out = []
    for segment in sorted({b.segment for b in blocks}):
        mine = [b for b in blocks if b.segment == segment]
        rss, ends = [b.rss_mib for b in mine], [b.start + b.steps for b in mine]
        settled = rss[min(warmup, len(rss)) - 1 :]
        slope = float(np.polyfit(ends[-len(settled) :], settled, 1)[0]) * 1e5 if len(settled) > 2 else None
        out.append({"segment": segment, "blocks": len(rss), "first": rss[0], "max": max(rss), "last": rss[-1],
                    "after_warmup": settled[0], "growth": max(settled) - settled[0], "slope_per_100k": slope})  # fmt: skip
    return out


def print_table(console: Console, result: dict) -> None:
    s, d = result["summary"], result["summary"]["distance"]
    table = Table(
        title=f"soak: {result['model']} at width {result['width']}, {result['onnxruntime']} on {result['cpu']}"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("steps run", f"{s['steps']:,} of {result['args']['steps']:,}"),
        ("steps/s: graph alone (1 thread) / whole stream", f"{s['graph_steps_per_s']:,.0f} / {s['stream_steps_per_s']:,.0f}"),
        ("wall seconds (all segments)", f"{result['wall_s']:,.0f}"),
        ("non-finite values", str(s["nonfinite"])),
        *[(f"RSS MiB seg {r['segment']}: block 1 / max / last; slope per 100k",
           f"{r['first']:.1f} / {r['max']:.1f} / {r['last']:.1f}; {r['slope_per_100k'] or 0:+.2f}") for r in s["rss_mib"]],
        ("max |graph - fp64|: first 10% / last 10%", f"{d['first_10pct']:.3g} / {d['last_10pct']:.3g}"),
        ("max |graph - fp64|: overall (limit)", f"{d['overall']:.3g} ({d['limit']:.3g})"),
        (f"first {result['context']['steps']} steps: fp32 torch / graph vs fp64",
         f"{result['context']['fp32_reference_max']:.3g} / {result['context']['graph_max']:.3g}"),
        ("max |state|; state vs fp64", f"{d['max_state']:.3g}; {d['state_vs_fp64']:.3g}"),
        ("fp64 chunked vs single steps", f"{result['verify']['max_abs']:.2g}"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    for name, (ok, why) in s["verdicts"].items():
        verdict = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "not judged"}[ok]
        table.add_row(f"[bold]{name}[/bold]", f"{verdict} {why}")
    console.print(table)
