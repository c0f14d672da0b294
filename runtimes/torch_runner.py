"""The reference runner: NestedLM in fp32, speaking the exported graphs' I/O.

It takes the same feeds as the step or prefill ONNX graph of the model (``input_ids``,
``past.{i}.*``, ``position`` when the model has attention) and returns the same outputs
(``logits``, ``present.{i}.*``, ``present.position``), so a comparator can put it beside
any other runner. The model runs at its full width: export extracts first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgeseq.export.spec import GraphIO, graph_io
from edgeseq.runtimes.base import Runner

if TYPE_CHECKING:
    from edgeseq.model import NestedLM


class TorchRunner(Runner):
    def __init__(
        self,
        model: NestedLM,
        kind: str = "step",
        device: str = "cpu",
        all_logits: bool = False,
        name: str | None = None,
    ):
        super().__init__(name or f"torch-{kind}-{device}")
        self.model, self.kind, self.device, self.all_logits = model, kind, device, all_logits
        self._io = graph_io(model.config, kind, all_logits)
        self._fp32: NestedLM | None = None

    @property
    def io(self) -> GraphIO:
        return self._io

    def _activate(self) -> None:
        import torch

        weight = self.model.embedding.weight
        if weight.dtype == torch.float32 and weight.device == torch.device(self.device):
            self._fp32 = self.model  # already the reference; no copy
        else:
            import copy

            self._fp32 = copy.deepcopy(self.model).to(device=self.device, dtype=torch.float32)
        self._fp32.eval()

    def _deactivate(self) -> None:
        self._fp32 = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from edgeseq.state import ModelState

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.tensor(a, device=self.device)  # a copy: the caller's arrays stay untouched

        ids = tensor(feeds["input_ids"])  # (b, 1) or (b, t)
        named = {k.removeprefix("past."): tensor(v) for k, v in feeds.items() if k.startswith("past.")}
        if "position" in feeds:
            named["position"] = tensor(feeds["position"])
        else:  # Mamba2 only: the graphs carry no position, and nothing reads it
            named["position"] = torch.zeros(ids.size(0), dtype=torch.int64, device=self.device)
        state = ModelState.from_named(self.model.config, named)
        with torch.no_grad():
            if self.kind == "step":
                logits, state = self._fp32.step(ids, state)  # (b, v)
                if self.all_logits:
                    logits = logits[:, None]  # (b, 1, v)
            else:
                logits, state = self._fp32(ids, state, last_only=not self.all_logits)
        produced = {f"present.{k}": v for k, v in state.to_named().items()}
        produced["logits"] = logits
        # contiguous, as a graph's outputs are (the model's conv state is a strided view)
        return {spec.name: np.ascontiguousarray(produced[spec.name].cpu().numpy()) for spec in self.io.outputs}
