"""Streaming text from a bundle, without PyTorch (``edgeseq run``).

The bundle is opened by ``StreamingSession.from_bundle``: the runtime that streams the
flavor here, on the execution providers and threads of the bundle's target profile."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeseq.data import EOS, text_to_ids
from edgeseq.deploy.bundle import BundleError
from edgeseq.runtimes.session import StreamingSession


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def stream_text(
    bundle: Path,
    prompt: str,
    n: int,
    temperature: float,
    top_k: int,
    seed,
    flavor,
    threads,
    emit: Callable[[str], None],
) -> dict:
    with StreamingSession.from_bundle(bundle, flavor, threads=threads) as session:
        if session.vocab_size is None or session.vocab_size <= EOS:
            raise BundleError(f"{bundle} holds a model of {session.vocab_size} tokens, not bytes; "
                              "edgeseq run streams text from byte-level models only")  # fmt: skip
        return _stream(session, prompt, n, temperature, top_k, seed, emit)


def _stream(session: StreamingSession, prompt: str, n: int, temperature: float, top_k: int, seed,
            emit: Callable[[str], None]) -> dict:  # fmt: skip
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
    return {
        "new_tokens": produced,
        "tokens_per_s": produced / seconds if seconds else float("nan"),
        "flavor": session.flavor,
        "providers": ",".join(session.step_runner.providers_used),
    }
