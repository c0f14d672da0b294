"""Error statistics between a reference array and a candidate array, in numpy only.

Every statistic is computed in float64, whatever the arrays' dtypes. Logits are read as
rows over the last axis (the vocabulary): ``[B, V]`` has B rows, ``[B, T, V]`` has B*T.

A candidate element that is non-finite where the reference is not (or differs from it)
counts as an infinite error, so a NaN can never pass a ``<=`` limit unnoticed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from edgeseq.errors import UsageError


@dataclass(frozen=True)
class OutputStats:
    """Statistics of one output, over one call or accumulated over many."""

    name: str
    calls: int
    elements: int
    max_abs: float  # largest |candidate - reference|
    mean_abs: float
    rel_l2: float  # ||candidate - reference|| / ||reference||
    cosine: float  # <reference, candidate> / (||reference|| ||candidate||)
    nonfinite: int  # candidate elements that are non-finite where the reference is not
    top1_agreement: float | None = None  # logits only: fraction of rows whose argmax agrees
    kl: float | None = None  # logits only: mean KL(reference || candidate) per row, nats
    rows: int | None = None  # logits only

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax in float64: shift by the row max before exponentiating."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def kl_per_row(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(candidate)) for each row over the last axis, nats."""
    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    p = np.exp(log_p)
    # 0 * log(0 / q) is 0: rows where p underflows to 0 contribute nothing.
    terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return np.maximum(np.sum(terms, axis=-1), 0.0).reshape(-1)  # rounding can dip below 0


def top1_matches(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Boolean per row: does the candidate's argmax over the last axis equal the reference's?"""
    return (np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)).reshape(-1)


def abs_error(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """|candidate - reference| in float64; inf where the candidate is wrongly non-finite."""
    r, c = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(c - r)
    same = (r == c) | (np.isnan(r) & np.isnan(c))  # equal infinities and NaN-for-NaN agree
    return np.where(same, 0.0, np.where(np.isfinite(err), err, np.inf))


class ErrorAccumulator:
    """Running statistics of one output over many (reference, candidate) pairs.

    Shapes may differ between calls (prompts of several lengths); each call's arrays must
    match each other. Keeps sums, not arrays, so a long stream costs constant memory.
    """

    def __init__(self, name: str, logits: bool = False):
        self.name, self.logits = name, logits
        self.calls = self.elements = self.nonfinite = 0
        self.max_abs = self.sum_abs = self.sum_sq_err = 0.0
        self.sum_rr = self.sum_cc = self.sum_rc = 0.0
        self.rows = self.top1_hits = 0
        self.kl_sum = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> float:
        """Fold one call in; returns this call's max abs error."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise UsageError(f"{self.name}: shape {candidate.shape} != reference {reference.shape}")
        # fp32 pairs are differenced in fp32 (exact where they agree within 2x, else off by
        # 6e-8 of the difference) and summed in fp64: a 130M model's states are 20 MB a
        # call, and fp64 copies of them cost the validation a third of its time
        work = np.float32 if reference.dtype == candidate.dtype == np.float32 else np.float64
        r = reference.astype(work, copy=False).reshape(-1)
        c = candidate.astype(work, copy=False).reshape(-1)
        self.calls += 1
        self.elements += r.size
        if r.size == 0:
            return 0.0
        with np.errstate(invalid="ignore", over="ignore"):
            d = c - r
        if np.isfinite(d).all():  # the usual case: one pass per statistic
            # einsum, not BLAS: a multithreaded BLAS dot fights the runners' threads for the cores
            self.sum_sq_err += float(np.einsum("i,i->", d, d, dtype=np.float64))
            self.sum_rr += float(np.einsum("i,i->", r, r, dtype=np.float64))
            self.sum_cc += float(np.einsum("i,i->", c, c, dtype=np.float64))
            self.sum_rc += float(np.einsum("i,i->", r, c, dtype=np.float64))
            err = np.abs(d, out=d)
            bad = 0
        else:
            r, c = r.astype(np.float64), c.astype(np.float64)
            err = abs_error(r, c)
            bad = int(np.count_nonzero(np.isinf(err)))
            self.sum_sq_err += float(np.sum(err * err))
        self.nonfinite += bad
        call_max = float(err.max())
        self.max_abs = max(self.max_abs, call_max)
        self.sum_abs += float(err.sum(dtype=np.float64))
        if self.logits and reference.ndim >= 1:
            r, c = r.astype(np.float64, copy=False), c.astype(np.float64, copy=False)
            rows_r, rows_c = r.reshape(-1, reference.shape[-1]), c.reshape(-1, reference.shape[-1])
            self.rows += rows_r.shape[0]
            self.top1_hits += int(np.count_nonzero(top1_matches(rows_r, rows_c)))
            self.kl_sum += float(np.sum(kl_per_row(rows_r, rows_c))) if bad == 0 else math.inf
        return call_max

    def stats(self) -> OutputStats:
        n = max(self.elements, 1)
        if self.nonfinite:
            rel_l2, cosine = math.inf, math.nan
        else:
            rel_l2 = _ratio(math.sqrt(self.sum_sq_err), math.sqrt(self.sum_rr))
            cosine = _cosine(self.sum_rc, self.sum_rr, self.sum_cc)
        logit_stats = {}
        if self.logits:
            rows = max(self.rows, 1)
            logit_stats = {"top1_agreement": self.top1_hits / rows, "kl": self.kl_sum / rows, "rows": self.rows}
        return OutputStats(
            name=self.name,
            calls=self.calls,
            elements=self.elements,
            max_abs=self.max_abs,
            mean_abs=self.sum_abs / n,
            rel_l2=rel_l2,
            cosine=cosine,
            nonfinite=self.nonfinite,
            **logit_stats,
        )


def output_stats(name: str, reference: np.ndarray, candidate: np.ndarray, logits: bool = False) -> OutputStats:
    """Statistics of one output from one call."""
    acc = ErrorAccumulator(name, logits)
    acc.add(reference, candidate)
    return acc.stats()


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _cosine(rc: float, rr: float, cc: float) -> float:
    if rr == 0.0 and cc == 0.0:
        return 1.0  # two zero arrays agree
    if rr == 0.0 or cc == 0.0:
        return 0.0
    return rc / math.sqrt(rr * cc)
