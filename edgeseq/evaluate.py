"""Held-out bits per byte at each nested width, in any vocabulary.

The token stream is cut into ``segments`` contiguous pieces evaluated side by side as a
batch; each piece is read in chunks with the recurrent state carried across them, so
the cost is linear in the length and no context is thrown away inside a piece. Only
targets that are text count (BOS/EOS predictions are excluded), and their bits are
divided by the UTF-8 bytes of text they make (``edgeseq.tokenizer.tokenize_sample``):
total bits over bytes of source text, whatever the tokenizer. For byte ids both are the
byte targets themselves.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from edgeseq.errors import UsageError
from edgeseq.model import NestedLM


@torch.no_grad()
def bits_per_byte(model: NestedLM, tokens, width=None, segments: int = 16, chunk: int = 2048, device=None) -> float:
    """tokens: (n,) int byte ids, or a ``TokenizedText`` -> bits per byte of its text
    targets, model run at ``width``."""
    if isinstance(tokens, np.ndarray):
        scored = tokens < 256
        nbytes = scored.astype(np.int64)
    else:
        tokens, scored, nbytes = tokens.ids, tokens.scored, tokens.nbytes
    device = device or model.embedding.weight.device
    per = (len(tokens) - 1) // segments
    if per < 1:
        raise UsageError(f"{len(tokens)} tokens are too few for {segments} segments")
    starts = np.arange(segments) * per
    idx = starts[:, None] + np.arange(per + 1)[None, :]
    stream = torch.from_numpy(tokens[idx]).to(device)  # (segments, per + 1)
    counted = torch.from_numpy(scored[idx]).to(device)
    state = model.init_state(segments, width)
    nats = 0.0
    for lo in range(0, per, chunk):
        hi = min(lo + chunk, per)
        logits, state = model(stream[:, lo:hi], state, width=width)
        targets = stream[:, lo + 1 : hi + 1]
        mask = counted[:, lo + 1 : hi + 1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        nats += float((loss * mask.flatten()).sum())
    # the targets are one contiguous run of the stream: only a character cut at its very end loses its bytes
    text_bytes = int(nbytes[idx[:, 1:]].sum())
    if text_bytes == 0:
        raise UsageError("the evaluated tokens hold no text; evaluate more tokens")
    return nats / text_bytes / math.log(2)


def ngram_bits_per_byte(train: np.ndarray, test: np.ndarray, order: int = 2, discount: float = 0.75) -> float:
    """An order-``order`` byte n-gram (context of ``order`` previous bytes) with
    interpolated absolute discounting, trained on ``train`` and scored on ``test``.

    Both are uint8 byte arrays. The baseline the narrowest nested width must beat.
    """
    V = 256
    train = train.astype(np.int64)
    test = test.astype(np.int64)
    prob = np.full(len(test) - order, 1.0 / V)
    for k in range(order + 1):  # lower orders first; each interpolates with the previous
        if k == 0:
            counts = np.bincount(train, minlength=V).astype(np.float64)
            prob = (counts[test[order:]] + 1) / (counts.sum() + V)  # add-one unigram
            continue
        ctx_train = np.zeros(len(train) - k, np.int64)
        ctx_test = np.zeros(len(test) - order, np.int64)
        for j in range(k):
            ctx_train = ctx_train * V + train[j : len(train) - k + j]
            ctx_test = ctx_test * V + test[order - k + j : len(test) - k + j]
        joint_train = ctx_train * V + train[k:]
        joint_test = ctx_test * V + test[order:]
        uniq_joint, joint_counts = np.unique(joint_train, return_counts=True)
        uniq_ctx, ctx_counts = np.unique(ctx_train, return_counts=True)
        ctx_types = np.unique(uniq_joint // V, return_counts=True)
        c_joint = _lookup(uniq_joint, joint_counts, joint_test)
        c_ctx = _lookup(uniq_ctx, ctx_counts, ctx_test)
        n_types = _lookup(ctx_types[0], ctx_types[1], ctx_test)
        seen = c_ctx > 0
        safe = np.where(seen, c_ctx, 1)
        backoff_weight = discount * n_types / safe
        p = np.maximum(c_joint - discount, 0) / safe + backoff_weight * prob
        prob = np.where(seen, p, prob)
    return float(-np.log2(prob).mean())


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(keys, query)
    pos = np.minimum(pos, len(keys) - 1)
    return np.where(keys[pos] == query, values[pos], 0).astype(np.float64)
