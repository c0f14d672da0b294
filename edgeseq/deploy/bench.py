"""``edgeseq bench``: decode latency, prefill throughput and peak RSS per runtime.

Each runtime runs in a fresh process (spawned), so its peak RSS is its own. Batch 1;
decode is timed per token with the state fed back, median after a warm-up.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgeseq.deploy.bundle import read_manifest
from edgeseq.deploy.runtimes import runnable_here
from edgeseq.errors import EdgeseqError


def _time_session(session, steps: int, prompt: np.ndarray) -> dict:
    t = time.perf_counter()
    logits = session.prefill(prompt)
    prefill_s = time.perf_counter() - t
    times = []
    for k in range(steps + 5):
        token = int(np.argmax(logits))
        t = time.perf_counter()
        logits = session.step(token)
        times.append(time.perf_counter() - t)
    return {"decode_ms": statistics.median(times[5:]) * 1e3, "prefill_tokens_per_s": prompt.size / prefill_s}


def _bench_one(bundle: str, runtime: str, steps: int, prompt_len: int, threads: int) -> dict:
    from edgeseq.data import load_sample
    from edgeseq.runtimes.session import StreamingSession

    prompt = load_sample()[:prompt_len]
    if runtime == "torch":
        import torch

        from edgeseq.deploy.validation import reference_model
        from edgeseq.runtimes.torch_runner import TorchRunner

        torch.set_num_threads(threads)
        model, _ = reference_model(Path(bundle), read_manifest(bundle, verify=False), "cpu")
        step, prefill = TorchRunner(model, "step"), TorchRunner(model, "prefill")
        step.activate()
        prefill.activate()
        session = StreamingSession(step, prefill)
    else:
        session = StreamingSession.from_bundle(bundle, runtime.split(":")[1], threads=threads)
    row = {"runtime": runtime, **_time_session(session, steps, prompt)}
    row["peak_rss_bytes"] = peak_rss_bytes()
    return row


def peak_rss_bytes() -> int:
    """This process's own peak resident set size. Not Linux's ru_maxrss, which a process
    started by fork and exec (a spawned bench process) inherits from its parent: /proc's
    VmHWM belongs to the address space; ru_maxrss only where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def bench_bundle(bundle: Path, steps: int, prompt_len: int, threads: int, only: list[str] | None = None) -> list[dict]:
    """One row per runtime (``only``: those named, e.g. ["onnxruntime:portable"])."""
    manifest = read_manifest(bundle)
    # a flavor whose plugin nodes run through Python (onnxruntime-plugins) is a check, not a speed
    runtimes = []
    for f in manifest["flavors"]:
        runtime = runnable_here(f)
        if runtime is not None and runtime.plugins is None:
            runtimes.append(f"{runtime.name}:{f}")
    try:
        import torch  # noqa: F401

        runtimes.append("torch")
    except ImportError:
        pass
    if only:
        missing = sorted(set(only) - set(runtimes))
        if missing:
            raise EdgeseqError(f"cannot bench {missing} here; this bundle and machine offer {runtimes}")
        runtimes = [r for r in runtimes if r in only]
    ctx = mp.get_context("spawn")
    rows = []
    for runtime in runtimes:
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_bench_one, (str(bundle), runtime, steps, prompt_len, threads)))
    return rows
