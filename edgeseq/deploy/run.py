"""Streaming text from a bundle, without PyTorch (``edgeseq run``).

The runners come from ``edgeseq.deploy.runtimes``: the runtime that streams the flavor
here, on the execution providers and threads of the bundle's target profile."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeseq.data import EOS, text_to_ids
from edgeseq.deploy.bundle import BundleError, read_manifest
from edgeseq.deploy.runtimes import Placement, open_runner, runnable_here
from edgeseq.export.spec import GraphIO


def open_session(bundle: Path, flavor: str | None = None, threads: int | None = None):
    """(StreamingSession over the bundle's graphs, flavor, step runner). ``threads``
    overrides the target profile's (0: the runtime's default, all cores)."""
    from edgeseq.runtimes.session import StreamingSession

    manifest = read_manifest(bundle)
    if manifest["config"]["vocab_size"] <= EOS:
        raise BundleError(f"{bundle} holds a model of {manifest['config']['vocab_size']} tokens, not bytes; "
                          "edgeseq run streams text from byte-level models only")
    runnable = [f for f in manifest["flavors"] if runnable_here(f)]
    flavor = flavor or (runnable[0] if runnable else None)
    if flavor not in runnable:
        raise BundleError(f"no runtime here runs flavor {flavor!r}; the bundle's runnable flavors: {runnable}")
    placement = Placement.of_target(manifest.get("target", {}), threads)
    ios = {k: GraphIO.from_dict(manifest["io"][k]) for k in ("step", "prefill")}
    step, prefill = (open_runner(bundle, manifest, flavor, kind, placement) for kind in ("step", "prefill"))
    step.activate()
    prefill.activate()
    return StreamingSession(step, prefill, ios["step"]), flavor, step


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def stream_text(bundle: Path, prompt: str, n: int, temperature: float, top_k: int, seed, flavor, threads,
                emit: Callable[[str], None]) -> dict:
    session, flavor, step = open_session(Path(bundle), flavor, threads)
    rng = np.random.default_rng(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    emit(prompt)
    logits = session.prefill(text_to_ids(prompt))
    produced, t0 = 0, time.perf_counter()
    for _ in range(n):
        token = sample(logits, temperature, top_k, rng)
        if token == EOS:
            break
        produced += 1
        if token < 256:
            emit(decoder.decode(bytes([token])))
        logits = session.step(token)
    emit(decoder.decode(b"", final=True))
    seconds = time.perf_counter() - t0
    return {"new_tokens": produced, "tokens_per_s": produced / seconds if seconds else float("nan"),
            "flavor": flavor, "providers": ",".join(step.providers_used)}
