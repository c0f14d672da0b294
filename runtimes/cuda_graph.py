"""GraphedDecoder: the PyTorch model's decode step captured once in a CUDA graph.

    decoder = GraphedDecoder(model.use_kernels(), batch=1)   # model on CUDA, any dtype
    logits = decoder.prefill(prompt_ids)                      # (b, v); eager, chunked scan
    logits = decoder.step(next_ids)                           # (b, v); one graph replay

A batch-1 step launches a few hundred small kernels; launched from Python each costs more
than it computes. The graph records them once, with the state in fixed buffers: replay
reads the token from ``ids`` and writes the next state back into the same buffers, so
the host does one copy and one replay per token. ``fuse=True`` first compiles the step
with ``torch.compile`` (inductor fuses the norms and elementwise ops into few kernels;
the custom ops stay opaque calls) and captures the compiled step.

The context check of global attention reads the position on the host, which a capture
cannot; the decoder counts tokens itself and refuses a stream that would overflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from edgeseq.errors import ConfigError, RuntimeUnavailableError
from edgeseq.state import ModelState

if TYPE_CHECKING:
    from edgeseq.model import NestedLM


class GraphedDecoder:
    def __init__(self, model: NestedLM, batch: int = 1, width=None, fuse: bool = False, warmup: int = 3):
        if not torch.cuda.is_available() or model.embedding.weight.device.type != "cuda":
            raise RuntimeUnavailableError("GraphedDecoder needs the model on a CUDA device; move it with model.cuda()")
        self.model, self.width = model, model.widths(width)
        self.state = model.init_state(batch, self.width)  # the graph's fixed buffers
        self.ids = torch.zeros(batch, dtype=torch.int64, device=model.embedding.weight.device)
        self._tokens, self._limit = 0, self._context_limit()
        step = torch.compile(model.step, dynamic=False) if fuse else model.step

        def run() -> Tensor:
            logits, new = step(self.ids, self.state, self.width, check_context=False)
            for buffer, value in zip(self.state.to_named().values(), new.to_named().values()):
                buffer.copy_(value)
            return logits

        saved = self.state.clone()
        side = torch.cuda.Stream()  # warm up off the capture stream: autotuning, compilation, lazy init
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = run()
        self._load(saved)

    def _context_limit(self) -> int | None:
        return self.model.config.stream_limit()

    def _count(self, tokens: int) -> None:
        """Count the most tokens any stream took (a padded stream took fewer)."""
        if self._limit is not None and self._tokens + tokens > self._limit:
            raise ConfigError(
                f"stream exceeds the global attention cache of {self._limit} tokens; raise attention.max_context or reset"
            )
        self._tokens += tokens

    def _load(self, state: ModelState) -> None:
        for buffer, value in zip(self.state.to_named().values(), state.to_named().values()):
            buffer.copy_(value)

    def reset(self) -> None:
        """Start a new stream: zero state."""
        self._load(self.model.init_state(self.ids.size(0), self.width))
        self._tokens = 0

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids (b, t) -> last logits (b, v), eagerly through the chunked scan, continuing the stream.
        mask (b, t) or None: 0 marks a left pad, which leaves its stream as it was (``NestedLM.forward``)."""
        device = self.ids.device
        mask = None if mask is None else mask.to(device)
        self._count(ids.size(1) if mask is None else int(mask.sum(1).max()))
        logits, state = self.model(ids.to(device), self.state.clone(), self.width, last_only=True, mask=mask)
        self._load(state)
        return logits

    def step(self, ids: Tensor) -> Tensor:
        """ids (b,) -> logits (b, v): one replay. The returned tensor is overwritten by the next step."""
        self._count(1)
        self.ids.copy_(ids.reshape(-1))
        self.graph.replay()
        return self.logits
