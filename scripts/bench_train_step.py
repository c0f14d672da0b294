"""Time Matryoshka training steps on the GPU (eager vs torch.compile) to size a run.

Prints a table and writes JSON: tokens/s per model and mode.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from edgeseq.model import NestedLM
from edgeseq.train import param_groups
from edgeseq.zoo import BUILTIN


def time_steps(name: str, compile: bool, batch: int, seq_len: int, steps: int) -> float:
    config = BUILTIN[name]
    model = NestedLM(config).cuda()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=True)
    fn = torch.compile(model) if compile else model
    ids = torch.randint(0, 256, (batch, seq_len + 1), device="cuda")

    def one():
        for w in config.nested_widths:
            with torch.autocast("cuda", torch.bfloat16):
                logits, _ = fn(ids[:, :-1], width=w)
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_train.json")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    rows = []
    for name in BUILTIN:
        for compile in (False, True):
            for batch, seq in ((32, 512), (64, 512)):
                try:
                    s = time_steps(name, compile, batch, seq, args.steps)
                    rows.append({"model": name, "compile": compile, "batch": batch, "seq": seq, "s_per_step": s,
                                 "tokens_per_s": batch * seq / s})
                except Exception as e:  # report and go on: this is a sizing probe
                    rows.append({"model": name, "compile": compile, "batch": batch, "seq": seq, "error": repr(e)[:200]})
                print(json.dumps(rows[-1]), flush=True)
    print(f"{'model':<12} {'compile':<8} {'batch':>5} {'s/step':>8} {'tok/s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {r['compile']!s:<8} {r['batch']:>5} error")
        else:
            print(f"{r['model']:<12} {r['compile']!s:<8} {r['batch']:>5} {r['s_per_step']:>8.3f} {r['tokens_per_s']:>10.0f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
