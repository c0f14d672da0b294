"""Streaming text from a bundle, without PyTorch (``edgeseq run``).

The bundle is opened by ``StreamingSession.from_bundle``: the runtime that streams the
flavor here, on the execution providers and threads of the bundle's target profile, and
the bundle's tokenizer (its ``tokenizer.json``, else bytes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeseq.runtimes.session import StreamingSession, sample

__all__ = ["sample", "stream_text"]


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
        session.tokenizer.check_vocab(session.vocab_size)
        return _stream(session, prompt, n, temperature, top_k, seed, emit)


def _stream(session: StreamingSession, prompt: str, n: int, temperature: float, top_k: int, seed,
            emit: Callable[[str], None]) -> dict:  # fmt: skip
    rng = np.random.default_rng(seed)
    decoder = session.tokenizer.stream_decoder(after=session.tokenizer.prompt_ids(prompt))
    emit(prompt)
    logits = session.prefill_text(prompt)
    produced, t0 = 0, time.perf_counter()  # decode speed: the prompt's prefill is not timed
    for _ in range(n):
        token = sample(logits, temperature, top_k, rng)
        if token in session.tokenizer.eos_ids:
            break
        produced += 1
        emit(decoder.step(token))
        logits = session.step(token)
    emit(decoder.flush())
    seconds = time.perf_counter() - t0
    return {
        "new_tokens": produced,
        "tokens_per_s": produced / seconds if seconds else float("nan"),
        "flavor": session.flavor,
        "providers": ",".join(session.step_runner.providers_used),
        "tokenizer": session.tokenizer.kind,
    }
