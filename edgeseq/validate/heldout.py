"""The held-out quality gate: bits per byte, top-1, KL on text the model never saw.

Quantization moves individual logits by design, so a quantized bundle is judged by what
a user sees on held-out text: does it still pick the same next byte (top-1), is its
distribution close (KL), does it predict as well (bits per byte). The fp32 reference and
the candidate take the same ``streams`` windows of the shipped held-out sample, batched
as one stream per batch row, each side feeding back its own state, so the two differ only
by the runtime and its precision. Given the prefill graphs too, each window is fed as an
app feeds it (``feeding_plan``): prompts through prefill, the rest through decode steps.

A model with its own tokenizer (a bundle's ``tokenizer.json``) is fed the held-out text in
its vocabulary (``edgeseq.tokenizer.tokenize_sample``), and its bits per token are put per
byte by dividing by the mean UTF-8 bytes per token of its windows, so the delta limit
means about the same for every vocabulary; for bytes, every target is one byte as before.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from edgeseq.export.spec import TOLERANCES, GraphIO
from edgeseq.validate.compare import infer_arrays, token_feeds, zero_state
from edgeseq.validate.metrics import kl_per_row, log_softmax, top1_matches
from edgeseq.validate.streams import beside


@dataclass(frozen=True)
class HeldoutResult:
    """The candidate against the reference on the same held-out windows (teacher forced)."""

    reference_bpb: float
    candidate_bpb: float
    top1_agreement: float  # fraction of positions whose argmax agrees
    kl: float  # mean KL(reference || candidate) per position, nats
    tokens: int  # predicted tokens, all windows together
    precision: str
    prefill_top1: float | None = None  # the same, over the bytes prefill calls predict (None: no prefill graph)
    prefill_kl: float | None = None
    prefill_tokens: int = 0

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
        # after prefill calls (a few dozen bytes) only KL is judged: top-1 over so few moves in steps of 3 %
        if self.prefill_tokens and not (self.prefill_kl <= tol.kl):
            out.append(f"after prefill: KL {self.prefill_kl:.4g} > limit {tol.kl:g}")
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


def heldout_windows(streams: int = 16, tokens: int = 512, seed: int = 0, tokenizer=None) -> np.ndarray:
    """``streams`` windows of ``tokens + 1`` ids from the shipped held-out sample, [S, T+1]:
    bytes, or the sample tokenized by ``tokenizer`` (an ``edgeseq.tokenizer.Tokenizer``)."""
    return _windows(streams, tokens, seed, tokenizer)[0]


def _windows(streams: int, tokens: int, seed: int, tokenizer) -> tuple[np.ndarray, float]:
    """(windows [S, T+1], UTF-8 bytes per target token over them: 1.0 for bytes)."""
    from edgeseq.data import load_sample
    from edgeseq.tokenizer import ByteTokenizer, tokenize_sample

    if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
        sample, nbytes = load_sample(), None
    else:  # enough text for windows that rarely overlap, not the whole sample
        text = tokenize_sample(tokenizer, limit=max(8 * streams * (tokens + 1), 1 << 16))
        sample, nbytes = text.ids, text.nbytes
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(sample) - tokens - 1, size=streams, replace=False)
    windows = np.stack([sample[s : s + tokens + 1] for s in starts]).astype(np.int64)
    if nbytes is None:
        return windows, 1.0
    held = sum(int(nbytes[s + 1 : s + tokens + 1].sum()) for s in starts)
    return windows, max(held, 1) / (streams * tokens)


def feeding_plan(tokens: int, prefill: bool) -> list[tuple[str, int, int]]:
    """How each window of ``tokens`` inputs is fed, as (graph, start, end) segments.

    With prefill graphs the gate runs as a chat app does: turns of a prompt through the
    prefill graph (from the state decode left) and decode steps from the state it hands
    over, each 1/8 of the window:

        | prefill | decode | prefill | decode | prefill | decode | prefill | decode |

    so that the bytes prefill calls predict (the byte after each prompt) are also judged
    on their own (KL; top-1 reported). Without, every input is a decode step."""
    if not prefill or tokens < 8:
        return [("step", 0, tokens)]
    edges = [tokens * i // 8 for i in range(9)]
    return [("prefill" if i % 2 == 0 else "step", edges[i], edges[i + 1]) for i in range(8)]


def heldout_gate(reference, candidate, io: GraphIO, precision: str, streams: int = 16, tokens: int = 512,
                 prefill: tuple | None = None, tokenizer=None) -> HeldoutResult:  # fmt: skip
    """Feed the same held-out windows through both sides, one stream per batch row, each
    side feeding back its own state, and score every next byte a call predicts on both.

    reference, candidate: step runners. prefill: (reference, candidate, io) prefill
    runners; given, each window is fed per ``feeding_plan`` (prompt, decode, prompt,
    decode), so the gate judges the prefill graphs and the state they hand to decode.
    Each prefill call predicts one byte (the one after its prompt), each step one.
    tokenizer: the model's own (None: bytes); a TokenizerError says it cannot map to bytes."""
    pre = None if prefill is None else (prefill[0], [prefill[1]], prefill[2])
    return heldout_gates(reference, [candidate], io, precision, streams, tokens, pre, tokenizer)[0]


def heldout_gates(reference, candidates, io: GraphIO, precision: str, streams: int = 16, tokens: int = 512,
                  prefill: tuple | None = None, tokenizer=None) -> list[HeldoutResult]:  # fmt: skip
    """``heldout_gate`` for several candidates (a bundle's flavors) on one run of the
    reference: one result per candidate. prefill: (reference, one runner per candidate, io)."""
    windows, bytes_per_token = _windows(streams, tokens, 0, tokenizer)
    pairs = dict(io.state_pairs)
    graphs = {"step": ([reference, *candidates], io)}
    if prefill is not None:
        graphs["prefill"] = ([prefill[0], *prefill[1]], prefill[2])
    sides = len(candidates) + 1
    states = [zero_state(io, batch=streams) for _ in range(sides)]
    nats = [0.0] * sides
    scores = [_Score() for _ in candidates]
    rows = np.arange(streams)

    def call(kind: str, ids: np.ndarray, target: np.ndarray) -> None:
        runners, graph_io = graphs[kind]
        runs = [partial(infer_arrays, runner, {**token_feeds(graph_io, ids.copy()), **states[side]})
                for side, runner in enumerate(runners)]  # fmt: skip
        logits = []
        for side, out in enumerate(beside(pool, runs[0], runs[1:])):  # the reference beside the candidates
            last = out["logits"][:, -1] if out["logits"].ndim == 3 else out["logits"]  # [S, V]
            logits.append(last)
            nats[side] -= float(np.sum(log_softmax(last)[rows, target]))
            states[side] = {past: out[present] for past, present in pairs.items()}
        for score, theirs in zip(scores, logits[1:]):
            kl = float(np.sum(kl_per_row(logits[0], theirs)))
            score.add(kl, int(np.count_nonzero(top1_matches(logits[0], theirs))), streams, kind == "prefill")

    with ThreadPoolExecutor(max_workers=1) as pool:
        for kind, start, end in feeding_plan(tokens, prefill is not None):
            if kind == "prefill":
                call(kind, windows[:, start:end], windows[:, end])
            else:
                for t in range(start, end):
                    call(kind, windows[:, t : t + 1], windows[:, t + 1])
    n = scores[0].n
    bits = [nats[side] / n / math.log(2) / bytes_per_token for side in range(sides)]
    return [HeldoutResult(bits[0], bits[side], score.hits / n, score.kl / n, n, precision,
                          *score.after_prefill()) for side, score in enumerate(scores, start=1)]  # fmt: skip


@dataclass
class _Score:
    """One candidate's agreement with the reference, summed over calls (and over the calls
    that follow a prompt, apart)."""

    kl: float = 0.0
    hits: int = 0
    n: int = 0
    prefill_kl: float = 0.0
    prefill_hits: int = 0
    prefill_n: int = 0

    def add(self, kl: float, hits: int, n: int, after_prefill: bool) -> None:
        self.kl, self.hits, self.n = self.kl + kl, self.hits + hits, self.n + n
        if after_prefill:
            self.prefill_kl, self.prefill_hits = self.prefill_kl + kl, self.prefill_hits + hits
            self.prefill_n += n

    def after_prefill(self) -> tuple[float | None, float | None, int]:
        m = self.prefill_n
        return (self.prefill_hits / m if m else None), (self.prefill_kl / m if m else None), m
