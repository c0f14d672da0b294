"""Decode speed on this CPU: exported step graphs in onnxruntime vs the PyTorch eager step.

    python3 scripts/bench_decode.py [--threads 2] [--steps 200] [--out bench_decode.json]

Rows: the shipped models at widths 1 and 1/2 (portable and opset27 graphs against
NestedLM.step, same weights, same thread count, measured side by side), and a Mamba2 of
the 130M class (hidden 768, 24 layers, vocab 50288, state 128, headdim 64; random
weights) in fp32. Prints a table and writes JSON. Batch 1, one token per call, state fed
back, median over steps after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from edgeseq.config import ModelConfig
from edgeseq.export.graphs import build_graph
from edgeseq.export.spec import graph_io
from edgeseq.extract import extract
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.model import NestedLM
from edgeseq.zoo import load_model


def mamba2_130m() -> NestedLM:
    config = ModelConfig.from_pattern(
        " ".join(["M"] * 24),
        d_model=768,
        vocab_size=50288,
        mamba=Mamba2Params(d_state=128, headdim=64, ngroups=1, expand=2, d_conv=4, chunk_size=256),
        nested_widths=(1.0,),
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return NestedLM(config).eval()


def time_ort(model: NestedLM, flavor: str, threads: int, steps: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(build_graph(model, "step", flavor).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    io = graph_io(model.config, "step")
    feeds = {t.name: np.zeros([1 if isinstance(d, str) else d for d in t.shape], t.dtype) for t in io.inputs}
    names = [o.name for o in io.outputs]
    pairs = dict((o, i) for i, o in io.state_pairs)
    times = []
    for k in range(steps + 10):
        feeds["input_ids"] = np.array([[k % 200]], np.int64)
        t = time.perf_counter()
        out = sess.run(names, feeds)
        times.append(time.perf_counter() - t)
        for name, value in zip(names, out):
            if name in pairs:
                feeds[pairs[name]] = value
    return statistics.median(times[10:])


@torch.no_grad()
def time_torch(model: NestedLM, steps: int) -> float:
    state = model.init_state(1)
    times = []
    for k in range(steps + 10):
        t = time.perf_counter()
        _, state = model.step(torch.tensor([k % 200]), state)
        times.append(time.perf_counter() - t)
    return statistics.median(times[10:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="bench_decode.json")
    ap.add_argument("--skip-130m", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("mamba2-tiny", "hybrid-tiny"):
        full, _ = load_model(name)
        for width in ("1", "0.5"):
            model = extract(full, width).eval()
            eager = time_torch(model, args.steps)
            row = {"model": name, "width": width, "torch_eager_ms": eager * 1e3}
            for flavor in ("portable", "opset27"):
                s = time_ort(model, flavor, args.threads, args.steps)
                row[f"ort_{flavor}_ms"] = s * 1e3
                row[f"speedup_{flavor}"] = eager / s
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not args.skip_130m:
        model = mamba2_130m()
        eager = time_torch(model, max(20, args.steps // 5))
        s = time_ort(model, "portable", args.threads, max(50, args.steps // 2))
        rows.append({"model": "mamba2-130m-class (random)", "width": "1", "torch_eager_ms": eager * 1e3,
                     "ort_portable_ms": s * 1e3, "speedup_portable": eager / s, "ort_tokens_per_s": 1 / s,
                     "torch_tokens_per_s": 1 / eager})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':<28} {'width':>5} {'eager ms':>9} {'portable ms':>12} {'x':>6} {'opset27 ms':>11} {'x':>6}")
    for r in rows:
        o27 = f"{r['ort_opset27_ms']:>11.2f} {r['speedup_opset27']:>6.1f}" if "ort_opset27_ms" in r else f"{'-':>11} {'-':>6}"
        print(f"{r['model']:<28} {r['width']:>5} {r['torch_eager_ms']:>9.2f} {r['ort_portable_ms']:>12.2f} "
              f"{r['speedup_portable']:>6.1f} {o27}")
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "batch": 1, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
