"""How far the fp32 reference is from an fp64 run of the same model, on the CPU and on
CUDA, over a greedy stream that starts from held-out text (the validator's long stream).
Prints the max abs logit error per 512-step block and overall.

    python3 scripts/diag_cuda_reference.py [--model mamba2-tiny] [--width 1] [--steps 2048]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from edgeseq.deploy.validation import stream_start
from edgeseq.extract import extract
from edgeseq.width import WidthSpec
from edgeseq.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mamba2-tiny")
    ap.add_argument("--width", default="1")
    ap.add_argument("--steps", type=int, default=2048)
    args = ap.parse_args()
    full, _ = load_model(args.model)
    sub = lambda dtype, dev: extract(full, WidthSpec.parse(args.width)).to(dtype).to(dev).eval()
    sides = {"fp64-cpu": sub(torch.float64, "cpu"), "fp32-cpu": sub(torch.float32, "cpu")}
    if torch.cuda.is_available():
        sides["fp32-cuda"] = sub(torch.float32, "cuda")
    states = {k: m.init_state(1) for k, m in sides.items()}
    tokens = stream_start(full.config)
    token = torch.from_numpy(tokens[:, 0])
    err = {k: [] for k in sides if k != "fp64-cpu"}
    with torch.no_grad():
        for t in range(args.steps):
            logits = {}
            for k, m in sides.items():
                dev = next(m.parameters()).device
                out, states[k] = m.step(token.to(dev), states[k])
                logits[k] = out.double().cpu().numpy()
            for k, series in err.items():
                series.append(float(np.abs(logits[k] - logits["fp64-cpu"]).max()))
            nxt = tokens[:, t + 1] if t + 1 < tokens.shape[1] else np.argmax(logits["fp64-cpu"], -1)
            token = torch.from_numpy(np.asarray(nxt, dtype=np.int64))
    for k, v in err.items():
        blocks = " ".join(f"{max(v[i:i + 512]):.1e}" for i in range(0, len(v), 512))
        print(f"{args.model} w{args.width} {k} vs fp64: max {max(v):.2e}; per 512 steps: {blocks}")


if __name__ == "__main__":
    main()
