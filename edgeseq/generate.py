"""Streaming generation through the reference path (prefill, then steps), in the model's
own vocabulary (``edgeseq.tokenizer``: bytes for the built-in models)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from edgeseq.model import NestedLM
from edgeseq.tokenizer import ByteTokenizer, Tokenizer


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
    tokenizer: Tokenizer | None = None,
) -> Iterator[int]:
    """Yield up to ``n`` sampled token ids (stops at the tokenizer's EOS; bytes when no
    tokenizer is given). temperature 0 = greedy. Decode them with
    ``tokenizer.stream_decoder()``.

    Appends one GenerationStats to ``stats`` when the stream ends.
    """
    tokenizer = tokenizer or ByteTokenizer()
    tokenizer.check_vocab(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    text = prompt.decode("utf-8", errors="replace") if isinstance(prompt, bytes) else prompt
    ids = torch.tensor([tokenizer.prompt_ids(text)])
    t0 = time.perf_counter()
    logits, state = model(ids, width=width, last_only=True)
    t1 = time.perf_counter()
    produced = 0
    for _ in range(n):
        token = _sample(logits[0].float(), temperature, top_k, gen)
        if token in tokenizer.eos_ids:
            break
        produced += 1
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
