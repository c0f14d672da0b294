"""The held-out quality gate of quantized bundles: bits per byte, top-1, KL.

Quantization moves individual logits by design, so a quantized bundle is judged by what
a user sees on text it never saw: does it still pick the same next byte (top-1), is its
distribution close (KL), does it predict as well (bits per byte). Both the fp32 reference and the candidate decode the same
``streams`` windows of the shipped held-out sample, ``tokens`` steps each, batched as one
stream per batch row with the state fed back, so the two sides differ only by the
runtime and its precision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from edgeseq.export.spec import TOLERANCES, GraphIO
from edgeseq.validate.compare import infer_arrays, token_input, zero_state
from edgeseq.validate.metrics import kl_per_row, log_softmax, top1_matches


@dataclass(frozen=True)
class HeldoutResult:
    """The candidate against the reference on the same held-out windows (teacher forced)."""

    reference_bpb: float
    candidate_bpb: float
    top1_agreement: float  # fraction of positions whose argmax agrees
    kl: float  # mean KL(reference || candidate) per position, nats
    tokens: int  # predicted tokens, all windows together
    precision: str

    @property
    def delta(self) -> float:
        return self.candidate_bpb - self.reference_bpb

    def failures(self) -> list[str]:
        tol, out = TOLERANCES[self.precision], []
        if not (self.delta <= tol.bpb_delta):
            out.append(f"bits/byte delta {self.delta:+.4f} > limit +{tol.bpb_delta:g}")
        if not (self.top1_agreement >= tol.top1_agreement):
            out.append(f"top-1 {self.top1_agreement:.4f} < limit {tol.top1_agreement:g}")
        if not (self.kl <= tol.kl):
            out.append(f"KL {self.kl:.4g} > limit {tol.kl:g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        head = (f"{'PASS' if self else 'FAIL'}: held-out {self.candidate_bpb:.4f} bits/byte vs reference "
                f"{self.reference_bpb:.4f} (delta {self.delta:+.4f}), top-1 {self.top1_agreement:.4f}, "
                f"KL {self.kl:.2e} over {self.tokens} tokens")
        return "; ".join([head, *self.failures()])

    def to_dict(self) -> dict:
        return asdict(self) | {"delta": self.delta, "passed": self.passed, "limits": asdict(TOLERANCES[self.precision])}


def heldout_windows(streams: int = 16, tokens: int = 512, seed: int = 0) -> np.ndarray:
    """``streams`` windows of ``tokens + 1`` bytes from the shipped held-out sample, [S, T+1]."""
    from edgeseq.data import load_sample

    sample = load_sample()
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(sample) - tokens - 1, size=streams, replace=False)
    return np.stack([sample[s : s + tokens + 1] for s in starts]).astype(np.int64)


def heldout_gate(reference, candidate, io: GraphIO, precision: str, streams: int = 16, tokens: int = 512) -> HeldoutResult:
    """Decode the same held-out windows through both step runners, one stream per batch
    row, each side feeding back its own state; every next byte is scored on both."""
    windows = heldout_windows(streams, tokens)
    token, pairs = token_input(io), dict(io.state_pairs)
    states = [zero_state(io, batch=streams), zero_state(io, batch=streams)]
    nats, kl, hits = [0.0, 0.0], 0.0, 0
    rows = np.arange(streams)
    for t in range(tokens):
        logits = []
        for side, runner in enumerate((reference, candidate)):
            out = infer_arrays(runner, {token: windows[:, t : t + 1], **states[side]})
            logits.append(out["logits"])  # [S, V]
            nats[side] -= float(np.sum(log_softmax(out["logits"])[rows, windows[:, t + 1]]))
            states[side] = {past: out[present] for past, present in pairs.items()}
        kl += float(np.sum(kl_per_row(*logits)))
        hits += int(np.count_nonzero(top1_matches(*logits)))
    n = streams * tokens
    return HeldoutResult(nats[0] / n / math.log(2), nats[1] / n / math.log(2), hits / n, kl / n, n, precision)

