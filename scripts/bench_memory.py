"""Constant memory over a long stream: RSS after 1k and after 100k decode steps.

    python3 scripts/bench_memory.py [--steps 100000] [--out bench_memory.json]

The exported step graph of each shipped model (width 1/2, portable flavor) runs in
onnxruntime on the CPU with its state fed back; the process's resident set size is read
from /proc at checkpoints. The goal: RSS after 100k steps within 1% of RSS after 1k.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from edgeseq.export.graphs import build_graph
from edgeseq.export.spec import graph_io
from edgeseq.extract import extract
from edgeseq.zoo import load_model

CHECKPOINTS = (1_000, 10_000, 50_000, 100_000)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def stream(name: str, steps: int, threads: int) -> dict:
    model = extract(load_model(name)[0], 0.5).eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(build_graph(model, "step", "portable").SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    io = graph_io(model.config, "step")
    del model
    feeds = {t.name: np.zeros([1 if isinstance(d, str) else d for d in t.shape], t.dtype) for t in io.inputs}
    names = [o.name for o in io.outputs]
    pairs = {o: i for i, o in io.state_pairs}
    rng = np.random.default_rng(0)
    token, rss, t0 = 0, {}, time.time()
    for k in range(1, steps + 1):
        feeds["input_ids"] = np.array([[token]], np.int64)
        out = dict(zip(names, sess.run(names, feeds)))
        for o, i in pairs.items():
            feeds[i] = out[o]
        p = np.exp(out["logits"][0] - out["logits"][0].max())
        token = int(rng.choice(p.size, p=p / p.sum()))  # sample so the stream stays varied
        if k in CHECKPOINTS or k == steps:
            rss[k] = rss_bytes()
    return {"model": name, "width": "0.5", "steps": steps, "seconds": round(time.time() - t0, 1),
            "rss": {str(k): v for k, v in rss.items()},
            "growth_1k_to_end": (rss[steps] - rss[1_000]) / rss[1_000]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_memory.json")
    args = ap.parse_args()
    rows = [stream(name, args.steps, args.threads) for name in ("mamba2-tiny", "hybrid-tiny")]
    print(f"{'model':<12} {'steps':>7} {'RSS @1k MiB':>12} {'RSS @end MiB':>13} {'growth':>8}")
    for r in rows:
        first, last = r["rss"]["1000"], r["rss"][str(r["steps"])]
        print(f"{r['model']:<12} {r['steps']:>7} {first / 2**20:>12.1f} {last / 2**20:>13.1f} {r['growth_1k_to_end']:>8.3%}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
