"""Streaming byte-level generation through the reference path (prefill, then steps)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from edgeseq.data import EOS, text_to_ids
from edgeseq.model import NestedLM


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@torch.no_grad()
def generate(
    model: NestedLM,
    prompt: str | bytes,
    n: int,
    width=None,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int | None = None,
    stats: list[GenerationStats] | None = None,
) -> Iterator[int]:
    """Yield up to ``n`` sampled byte values (stops at EOS). temperature 0 = greedy.

    Appends one GenerationStats to ``stats`` when the stream ends.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.tensor([text_to_ids(prompt)])
    t0 = time.perf_counter()
    logits, state = model(ids, width=width, last_only=True)
    t1 = time.perf_counter()
    produced = 0
    for _ in range(n):
        token = _sample(logits[0].float(), temperature, top_k, gen)
        if token == EOS:
            break
        produced += 1
        if token < 256:
            yield token
        logits, state = model.step(torch.tensor([token]), state, width=width)
    if stats is not None:
        stats.append(GenerationStats(ids.size(1), produced, t1 - t0, time.perf_counter() - t1))


def _sample(logits: torch.Tensor, temperature: float, top_k: int, gen) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
