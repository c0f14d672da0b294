"""Whole-model decode latency per token on a GPU: a 130M-class Mamba2 (hidden 768, 24 layers,
vocab 50288, state 128, head dim 64; random weights, bf16, fp32 state) through edgeseq's
paths, beside transformers' Mamba2ForCausalLM with the same weights, and against the
roofline (weight bytes + state bytes moved per token / the copy bandwidth measured here).
Batch 1 and 16. Prints a table and writes JSON.

    python3 scripts/bench_model_decode.py --out results.json [--no-compile]

Each row: median over 5 windows of 50 tokens (CUDA events around the whole window, host
work included), after 20 warm-up tokens. The transformers row names the path it ran
(its fused path needs mamba_ssm and causal_conv1d's CUDA extensions).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import mamba2_130m
from bench_kernels import copy_bandwidth

from edgeseq.families import save_checkpoint
from edgeseq.runtimes.cuda_graph import GraphedDecoder

WINDOWS, TOKENS, WARMUP = 5, 50, 20


def per_token_us(step, first) -> float:
    """step(token) -> logits; the median µs per token over WINDOWS windows of TOKENS greedy tokens."""
    token = first
    for _ in range(WARMUP):
        token = step(token).argmax(-1)
    times = []
    for _ in range(WINDOWS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TOKENS):
            token = step(token).argmax(-1)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / TOKENS)
    return statistics.median(times)


def edgeseq_rows(model, batch: int, prompt, compile_too: bool) -> dict[str, float]:
    rows = {}
    with torch.no_grad():
        for kernels in (False, True):
            model.use_kernels(kernels)
            _, state = model(prompt, last_only=True)
            box = [state]

            def eager(token):
                logits, box[0] = model.step(token, box[0])
                return logits

            rows[f"edgeseq eager, {'Triton kernels' if kernels else 'reference ops'}"] = per_token_us(eager, prompt[:, -1])
        for fuse in (False, True) if compile_too else (False,):
            decoder = GraphedDecoder(model, batch=batch, fuse=fuse)
            decoder.prefill(prompt)
            name = "edgeseq CUDA graph, Triton kernels" + (" + torch.compile" if fuse else "")
            rows[name] = per_token_us(decoder.step, prompt[:, -1])
    return rows


def transformers_row(model, batch: int, prompt) -> tuple[str, float, float]:
    """(path, µs per token, max |logit difference| to edgeseq over the first 8 steps)."""
    import importlib.util

    from transformers import Mamba2ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(copy.deepcopy(model).float().cpu(), Path(tmp) / "hf", format="hf")
        hf = Mamba2ForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.bfloat16).cuda().eval()
    fast = all(importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d"))
    path = "mamba_ssm + causal_conv1d kernels" if fast else "PyTorch fallbacks (mamba_ssm, causal_conv1d not installed)"
    with torch.no_grad():
        out = hf(input_ids=prompt, use_cache=True)
        box = [out.cache_params, prompt.size(1)]

        def step(token):
            pos = torch.tensor([box[1]], device="cuda")
            o = hf(input_ids=token.reshape(-1, 1), cache_params=box[0], use_cache=True, cache_position=pos)
            box[0], box[1] = o.cache_params, box[1] + 1
            return o.logits[:, -1]

        # same weights, same tokens: the two models' logits side by side
        model.use_kernels(True)
        _, state = model(prompt, last_only=True)
        token, diff = out.logits[:, -1].argmax(-1), 0.0
        for _ in range(8):
            ours, state = model.step(token, state)
            theirs = step(token)
            diff = max(diff, float((ours.float() - theirs.float()).abs().max()))
            token = theirs.argmax(-1)
        out = hf(input_ids=prompt, use_cache=True)
        box[:] = [out.cache_params, prompt.size(1)]
        return path, per_token_us(step, prompt[:, -1]), diff


def roofline_us(model, batch: int, bandwidth: float) -> float:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head reads the embedding
    state = model.init_state(batch).nbytes()
    return (weights + 2 * state) / bandwidth * 1e6  # the state is read and written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (its compile takes minutes)")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    bw = copy_bandwidth()
    model = mamba2_130m().to(device="cuda", dtype=torch.bfloat16)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = torch.randint(0, model.config.vocab_size, (batch, 64), device="cuda")
        row = {"batch": batch, "roofline_us": roofline_us(model, batch, bw)}
        path, hf_us, diff = transformers_row(model, batch, prompt)
        row |= {"transformers_path": path, "transformers_us": hf_us, "max_logit_diff_vs_transformers": diff}
        row["edgeseq"] = edgeseq_rows(model, batch, prompt, not args.no_compile)
        results.append(row)
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s; µs per token, median of {WINDOWS}x{TOKENS}")
    for r in results:
        print(f"batch {r['batch']}: roofline {r['roofline_us']:.1f} us; transformers ({r['transformers_path']}) "
              f"{r['transformers_us']:.1f} us; max |logit diff| edgeseq vs transformers {r['max_logit_diff_vs_transformers']:.3f}")
        for name, us in r["edgeseq"].items():
            print(f"  {name:<50} {us:>9.1f} us  x{r['transformers_us'] / us:6.2f} vs transformers  "
                  f"x{us / r['roofline_us']:5.2f} roofline")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": results},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
