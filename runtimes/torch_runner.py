"""The reference runner: NestedLM in fp32, speaking the exported graphs' I/O.

It takes the same feeds as the step or prefill ONNX graph of the model (``input_ids``,
a prefill's ``attention_mask``, ``past.{i}.*``, ``position`` when the model has
attention) and returns the same outputs
(``logits``, ``present.{i}.*``, ``present.position``), so a comparator can put it beside
any other runner. The model runs at its full width: export extracts first.

``dtype="float64"`` makes it the fp64 oracle the long stream's drift is judged against:
the model runs on an fp64 copy, and the runner's ``io`` declares every float input and
output (state, logits) float64, so it takes and returns its own fp64 state; names,
shapes and integer tensors are the graph's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from edgeseq.errors import UsageError
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
        dtype: str = "float32",
    ):
        """dtype: "float32" (the reference) or "float64" (the oracle); the model is copied
        to it (and to ``device``) on activate unless it already is."""
        if dtype not in _FLOAT_DTYPES:
            raise UsageError(f"TorchRunner runs float32 or float64, not {dtype!r}")
        suffix = "" if dtype == "float32" else f"-{_FLOAT_DTYPES[dtype]}"
        super().__init__(name or f"torch-{kind}-{device}{suffix}")
        self.model, self.kind, self.device, self.all_logits, self.dtype = model, kind, device, all_logits, dtype
        self._io = _float_io(graph_io(model.config, kind, all_logits), dtype)
        self._model: NestedLM | None = None

    @property
    def io(self) -> GraphIO:
        return self._io

    def _activate(self) -> None:
        import torch

        dtype, weight = getattr(torch, self.dtype), self.model.embedding.weight
        if weight.dtype == dtype and weight.device == torch.device(self.device):
            self._model = self.model  # already the reference (or oracle); no copy
        else:
            import copy

            self._model = copy.deepcopy(self.model).to(device=self.device, dtype=dtype)
        self._model.eval()

    def _deactivate(self) -> None:
        self._model = None

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
                logits, state = self._model.step(ids, state)  # (b, v)
                if self.all_logits:
                    logits = logits[:, None]  # (b, 1, v)
            else:
                mask = tensor(feeds["attention_mask"]) if "attention_mask" in feeds else None
                logits, state = self._model(ids, state, last_only=not self.all_logits, mask=mask)
        produced = {f"present.{k}": v for k, v in state.to_named().items()}
        produced["logits"] = logits
        # contiguous, as a graph's outputs are (the model's conv state is a strided view)
        return {spec.name: np.ascontiguousarray(produced[spec.name].cpu().numpy()) for spec in self.io.outputs}


_FLOAT_DTYPES = {"float32": "fp32", "float64": "fp64"}


def _float_io(io: GraphIO, dtype: str) -> GraphIO:
    """``io`` with every float tensor declared ``dtype`` (the model computes state and
    logits in its parameters' dtype); integer tensors (ids, positions) unchanged."""
    if dtype == "float32":
        return io
    as_dtype = lambda specs: tuple(replace(t, dtype=dtype) if t.dtype.startswith("float") else t for t in specs)
    return GraphIO(as_dtype(io.inputs), as_dtype(io.outputs), io.state_pairs)
