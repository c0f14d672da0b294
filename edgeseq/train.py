"""Matryoshka training of a nested model on stdlib bytes (the MatMamba recipe).

Every optimizer step sums the cross-entropy of all nested widths with equal weights, so
each prefix of every layer learns to be a model of its own. AdamW with linear warmup
and cosine decay; bf16 autocast on CUDA. The run writes a JSONL log, the data manifest
and a native checkpoint (fp16 weights) whose metadata records the held-out bits per
byte at each width.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeseq.data import encode, load_sample, manifest, split, stdlib_documents, write_sample
from edgeseq.evaluate import bits_per_byte, ngram_bits_per_byte
from edgeseq.families import save_checkpoint
from edgeseq.model import NestedLM
from edgeseq.zoo import BUILTIN

SLICE_TOKENS = 32_768  # the test's slice of the shipped sample (4 segments)


@dataclass
class TrainConfig:
    model: str = "mamba2-tiny"  # a built-in architecture
    steps: int = 3000
    batch: int = 32
    seq_len: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: int = 150
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    widths: tuple[float, ...] = field(default_factory=tuple)  # empty: the config's nested widths
    log_every: int = 50
    compile: bool = False
    max_seconds: float = 0.0  # stop once training (after the first, compiling step) took this long; 0: never
    stop_at: int = 0  # stop after this many steps of the ``steps``-long schedule (0: run them all)


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: NestedLM, weight_decay: float):
    """No decay on norms, biases, embeddings and the SSM's A_log, D, dt_bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        flat = p.dim() < 2 or name.startswith("embedding") or name.split(".")[-1] in ("A_log", "D", "dt_bias")
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batches(tokens: np.ndarray, tc: TrainConfig, device):
    rng = np.random.default_rng(tc.seed)
    while True:
        starts = rng.integers(0, len(tokens) - tc.seq_len - 1, tc.batch)
        window = tokens[starts[:, None] + np.arange(tc.seq_len + 1)[None, :]].astype(np.int64)
        yield torch.from_numpy(window).to(device, non_blocking=True)


def evaluate_widths(model: NestedLM, widths, tokens: np.ndarray) -> dict[str, dict[str, float]]:
    model.eval()
    out = {}
    for w in widths:
        out[f"{w:g}"] = {
            "heldout_bpb": round(bits_per_byte(model, tokens, w, segments=16), 5),
            "slice_bpb": round(bits_per_byte(model, tokens[: SLICE_TOKENS + 1], w, segments=4), 5),
        }
    model.train()
    return out


def train(tc: TrainConfig, out_dir: Path, device: str = "cuda") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    docs = stdlib_documents()
    train_docs, heldout_docs = split(docs)
    data_manifest = manifest(docs)
    (out_dir / "manifest.json").write_text(json.dumps(data_manifest) + "\n")
    sample_info = write_sample(heldout_docs, out_dir / "sample")
    sample = load_sample(out_dir / "sample")
    tokens = encode(train_docs)
    config = BUILTIN[tc.model]
    widths = tc.widths or config.nested_widths
    model = NestedLM(config).to(device)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, fused=device == "cuda")
    step_fn = torch.compile(model) if tc.compile else model
    log = (out_dir / "train_log.jsonl").open("w")
    log.write(json.dumps({"train_config": asdict(tc), "params": model.num_parameters(), "train_tokens": int(tokens.size),
                          "data_sha256": data_manifest["sha256"], "sample": {k: v for k, v in sample_info.items() if k != "list"}}) + "\n")
    stream = batches(tokens, tc, device)
    t0 = time.time()
    t_first = None  # end of step 0, which includes compilation
    steps_done = tc.stop_at or tc.steps
    for step in range(steps_done):
        if tc.max_seconds and t_first is not None and time.time() - t_first > tc.max_seconds:
            steps_done = tc.stop_at = step  # recorded, so the saved train_config reproduces this run
            print(json.dumps({"stopped_at": step}), flush=True)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        window = next(stream)
        ids, targets = window[:, :-1], window[:, 1:]
        losses = []
        for w in widths:
            with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
                logits, _ = step_fn(ids, width=w)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()  # per width, so only one width's activations are alive at a time
            losses.append(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            t_first = time.time()
        if step % tc.log_every == 0 or step == tc.steps - 1:
            record = {"step": step, "lr": lr_at(step, tc), "grad_norm": float(grad_norm), "elapsed_s": round(time.time() - t0, 1)}
            record |= {f"bpb@{w:g}": float(l) / math.log(2) for w, l in zip(widths, losses)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
    train_seconds = time.time() - t0
    model = model.half().float()  # evaluate exactly the weights that ship (fp16)
    results = evaluate_widths(model, config.nested_widths, sample)
    train_bytes = np.concatenate([np.frombuffer(d.data, np.uint8) for d in train_docs])
    sample_bytes = sample[sample < 256].astype(np.uint8)
    baseline = ngram_bits_per_byte(train_bytes, sample_bytes, order=2)
    metadata = {
        "trained": True,
        "train_config": asdict(tc),
        "steps": steps_done,
        "train_seconds": round(train_seconds, 1),
        "tokens_seen": steps_done * tc.batch * tc.seq_len,
        "data": {k: v for k, v in data_manifest.items() if k != "list"},
        "sample": {k: v for k, v in sample_info.items() if k != "list"},
        "eval": results,
        "slice_tokens": SLICE_TOKENS,
        "ngram_order2_bpb": round(baseline, 5),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    log.write(json.dumps({"final": metadata}) + "\n")
    log.close()
    save_checkpoint(model.half(), out_dir / tc.model, metadata=metadata, overwrite=True)
    return metadata
