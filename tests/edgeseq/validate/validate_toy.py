"""A numpy stand-in for an exported graph, so validate's tests need no runtime or torch.

    h_t = A h_{t-1} + E[x_t]        (b, n)    the state, fed back as past.0.ssm
    logits_t = h_t C                (b, v)

Two ToyRunners with the same seed are the same graph; keyword perturbations turn one into
a faulty candidate. Imports numpy and edgeseq.export.spec only (the torch-free check runs it).
"""

from __future__ import annotations

import numpy as np

from edgeseq.export.spec import BATCH, SEQ, GraphIO, TensorSpec

V, N = 11, 6  # vocabulary, state size


def toy_io(kind: str = "step", position: bool = True) -> GraphIO:
    tokens = 1 if kind == "step" else SEQ
    inputs = [TensorSpec("input_ids", "int64", (BATCH, tokens)), TensorSpec("past.0.ssm", "float32", (BATCH, N))]
    outputs = [TensorSpec("logits", "float32", (BATCH, V)), TensorSpec("present.0.ssm", "float32", (BATCH, N))]
    pairs = [("past.0.ssm", "present.0.ssm")]
    if position:
        inputs.append(TensorSpec("position", "int64", (BATCH,)))
        outputs.append(TensorSpec("present.position", "int64", (BATCH,)))
        pairs.append(("position", "present.position"))
    return GraphIO(tuple(inputs), tuple(outputs), tuple(pairs))


class ToyRunner:
    """Perturbations: logit_offset (added to every logit), a_scale (scales A, so the error
    grows along a stream), drop (an output left out), bad_shape (an output given an extra
    axis), nan_from (call index from which logits are NaN), roll (vocabulary shifted, so
    every argmax moves), position_skew (added to present.position). dtype: of the logits and
    state it returns; a float64 toy keeps its state exact, an fp64 oracle for the float32 ones."""

    device = "cpu"

    def __init__(self, seed: int = 0, name: str = "toy", *, logit_offset=0.0, a_scale=1.0, drop=None,
                 bad_shape=None, nan_from=None, roll=False, position_skew=0, dtype=np.float32):  # fmt: skip
        rng = np.random.default_rng(seed)
        self.A = np.diag(rng.uniform(0.5, 0.95, N)) * a_scale
        self.E = rng.normal(size=(V, N))
        self.C = rng.normal(size=(N, V))
        self.name, self.logit_offset, self.drop, self.bad_shape = name, logit_offset, drop, bad_shape
        self.nan_from, self.roll, self.position_skew, self.dtype = nan_from, roll, position_skew, dtype
        self.calls = 0
        self.seen: list[dict[str, np.ndarray]] = []  # every feed, copied
        self.active = False

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.seen.append({k: np.array(v) for k, v in feeds.items()})
        ids, h = feeds["input_ids"], feeds["past.0.ssm"].astype(np.float64)
        for t in range(ids.shape[1]):
            h = h @ self.A.T + self.E[ids[:, t]]
        logits = h @ self.C + self.logit_offset
        if self.roll:
            logits = np.roll(logits, 1, axis=-1)
        if self.nan_from is not None and self.calls >= self.nan_from:
            logits[:] = np.nan
        out = {"logits": logits.astype(self.dtype), "present.0.ssm": h.astype(self.dtype)}
        if "position" in feeds:
            out["present.position"] = feeds["position"] + ids.shape[1] + self.position_skew
        if self.bad_shape:
            out[self.bad_shape] = out[self.bad_shape][..., None]
        if self.drop:
            del out[self.drop]
        self.calls += 1
        return out
