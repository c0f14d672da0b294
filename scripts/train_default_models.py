"""Train the two shipped models side by side on one GPU and pack what comes back.

    python3 scripts/train_default_models.py --out OUT [--steps-mamba N --steps-hybrid N]

Each model trains in its own process (``edgeseq.train.train``); the results are packed
into OUT/<model>.tar (the native checkpoint) and OUT/extras.tar.gz (logs, the data
manifest, the held-out sample). Reproduce one model with the train_config recorded in
its metadata.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tarfile
from dataclasses import asdict
from pathlib import Path


def run_one(name: str, steps: int, batch: int, max_seconds: float, compile_: bool, work: str) -> None:
    from edgeseq.train import TrainConfig, train

    tc = TrainConfig(model=name, steps=steps, batch=batch, compile=compile_, max_seconds=max_seconds)
    meta = train(tc, Path(work) / name)
    print(json.dumps({"model": name, "eval": meta["eval"], "ngram": meta["ngram_order2_bpb"], "steps": meta["steps"],
                      "train_seconds": meta["train_seconds"], "config": asdict(tc)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/edgeseq_train")
    ap.add_argument("--steps-mamba", type=int, default=2400)
    ap.add_argument("--steps-hybrid", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=390)
    ap.add_argument("--eager", action="store_true", help="Skip torch.compile (compiling four widths of the hybrid takes minutes).")
    ap.add_argument("--only", choices=["mamba2-tiny", "hybrid-tiny"], help="Train one model only.")
    args = ap.parse_args()
    mp.set_start_method("spawn")
    jobs = [
        mp.Process(target=run_one, args=("mamba2-tiny", args.steps_mamba, args.batch, args.max_seconds, not args.eager, args.work)),
        mp.Process(target=run_one, args=("hybrid-tiny", args.steps_hybrid, args.batch, args.max_seconds, not args.eager, args.work)),
    ]
    if args.only:
        jobs = [j for j in jobs if j._args[0] == args.only]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    out, work = Path(args.out), Path(args.work)
    for name in [args.only] if args.only else ("mamba2-tiny", "hybrid-tiny"):
        ckpt = work / name / name
        if ckpt.is_dir():
            with tarfile.open(out / f"{name}.tar", "w") as tar:
                tar.add(ckpt, arcname=name)
    with tarfile.open(out / "extras.tar.gz", "w:gz") as tar:
        for name in ("mamba2-tiny", "hybrid-tiny"):
            for f in ("train_log.jsonl", "manifest.json"):
                if (work / name / f).is_file():
                    tar.add(work / name / f, arcname=f"{name}/{f}")
        for name in ("mamba2-tiny", "hybrid-tiny"):  # every run writes the same sample; pack one
            if (work / name / "sample").is_dir():
                tar.add(work / name / "sample", arcname="sample")
                break


if __name__ == "__main__":
    main()
