"""Prefill time of a long system prompt + a short user turn, without and with a warm prefix cache.

    python3 scripts/bench_prefix_cache.py [--system 1000] [--turn 16] [--runs 7] [--threads 1]
                                          [--out scripts/results/prefix_cache.json]

Rows: the shipped models (mamba2-tiny, hybrid-tiny) as fp32 portable bundles at widths 1 and
1/2, exported into a temporary folder and run with onnxruntime (``--threads`` intra-op
threads). "cold" prefills system + turn from zero; "warm" goes through a ``PrefixCache``
that holds the system prompt, so only the turn is prefilled. Times are medians over
``--runs`` after one warm-up, each run with a fresh random turn. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeseq.deploy.pipeline import ExportRequest, export_bundle
from edgeseq.runtimes.prefix_cache import PrefixCache
from edgeseq.runtimes.session import StreamingSession
from edgeseq.width import WidthSpec

MODELS = ["mamba2-tiny", "hybrid-tiny"]
WIDTHS = ["1", "1/2"]


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench(bundle: Path, args, rng: np.random.Generator) -> dict:
    with StreamingSession.from_bundle(bundle, threads=args.threads) as session:
        v = session.vocab_size
        system = rng.integers(0, v, args.system).tolist()
        turn = lambda: rng.integers(0, v, args.turn).tolist()
        cache = PrefixCache(max_bytes=4 * (session.state_bytes + 8 + 4 * v))

        def cold():
            session.reset()
            session.prefill(system + turn())

        session.prefill(system, cache=cache)  # the warm cache holds the system prompt

        def warm():  # a hit moves the system prompt to the recent end, so turns are evicted first
            session.prefill(system + turn(), cache=cache)

        cold_ms, warm_ms = median_ms(cold, args.runs), median_ms(warm, args.runs)
        return {"cold_ms": cold_ms, "warm_ms": warm_ms, "speedup": cold_ms / warm_ms,
                "state_bytes": session.state_bytes, "cache_hits": cache.hits}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", type=int, default=1000, help="system prompt tokens")
    p.add_argument("--turn", type=int, default=16, help="user turn tokens")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--widths", nargs="+", default=WIDTHS)
    p.add_argument("--out", type=Path, default=Path("scripts/results/prefix_cache.json"))
    args = p.parse_args()
    rng = np.random.default_rng()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for width in args.widths:
                root = Path(tmp) / f"{model}-w{width.replace('/', '_')}"
                export_bundle(ExportRequest(model=model, target="x86", width=WidthSpec.parse(width), output=root,
                                            flavor="portable", precision="fp32", validate=False))  # fmt: skip
                rows.append({"model": model, "width": width, **bench(root, args, rng)})
    print(f"system {args.system} + turn {args.turn} tokens, {args.threads} thread(s), median of {args.runs}")
    print(f"{'model':<14} {'width':>5} {'state KiB':>10} {'cold ms':>9} {'warm ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['model']:<14} {r['width']:>5} {r['state_bytes'] / 1024:>10.1f} {r['cold_ms']:>9.2f} "
              f"{r['warm_ms']:>9.2f} {r['speedup']:>7.1f}x")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("system", "turn", "runs", "threads")}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
