"""Does onnxruntime-genai run a bundle as edgeseq does? Torch-free.

For each held-out prompt, onnxruntime-genai loads the bundle directory (its
``genai_config.json`` and decoder graph) and decodes greedily; edgeseq's own runner
(the bundle's step and prefill graphs through ``StreamingSession``) decodes the same
prompt. The verdict: the same tokens at every step, and the logits each was picked from
within the precision's ``handoff_logit`` (both run the same graphs on the same
onnxruntime, so they differ only where the decoder's If branch orders work differently,
or where onnxruntime-genai feeds a one-token prompt to the step branch and edgeseq to the
prefill graph). Streams may part at a near tie — onnxruntime-genai's token within the
tolerance of edgeseq's best logit, which a quantized graph's rounding decides — and are
compared up to that step.
``export`` runs it before writing a bundle and ``validate`` on a written one, wherever
onnxruntime-genai is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeseq.deploy.runtimes import Placement, open_runner
from edgeseq.export.spec import TOLERANCES
from edgeseq.runtimes.genai_runner import (
    INSTALL,
    GenaiRunError,
    GenaiUnavailableError,
    context_length,
    genai_greedy,
    genai_installed,
    load_genai,
)
from edgeseq.runtimes.session import StreamingSession


@dataclass
class GenaiCheck:
    """The verdict; ``not_run`` says why it was not judged (then it counts as passed)."""

    tolerance: float = 0.0
    streams: list[dict] = field(default_factory=list)  # per prompt: length, tokens, first_difference, max_abs_logit
    not_run: str | None = None
    errors: list[str] = field(default_factory=list)  # onnxruntime-genai failed to load or generate

    def __bool__(self) -> bool:
        return not self.errors and all(
            (s["first_difference"] is None or s["near_tie"]) and s["max_abs_logit"] <= self.tolerance
            for s in self.streams
        )

    def summary(self) -> str:
        if self.not_run:
            return f"onnxruntime-genai not run ({self.not_run})"
        if self.errors:
            return f"onnxruntime-genai FAIL: {self.errors[0]}"
        worst = max((s["max_abs_logit"] for s in self.streams), default=0.0)
        same = sum(s["first_difference"] is None for s in self.streams)
        ties = sum(s["first_difference"] is not None and s["near_tie"] for s in self.streams)
        return (f"onnxruntime-genai {'pass' if self else 'FAIL'}: {same}/{len(self.streams)} greedy streams equal"
                f"{f', {ties} parted at a near tie' if ties else ''} ({sum(s['tokens'] for s in self.streams)} "
                f"tokens), max |logit diff| {worst:.2e} (limit {self.tolerance:g})")  # fmt: skip

    def to_dict(self) -> dict:
        return {"passed": bool(self), "summary": self.summary(), "tolerance": self.tolerance,
                "streams": self.streams, "not_run": self.not_run, "errors": self.errors}  # fmt: skip


STEPS = 64  # greedy tokens per prompt in export and validate: a wrong binding shows within a few


def check_genai(bundle: Path, manifest: dict, prompts: list[np.ndarray], steps: int = STEPS,
                tolerance: float | None = None) -> GenaiCheck:  # fmt: skip
    """onnxruntime-genai against the bundle's own graphs, ``steps`` greedy tokens per prompt.
    ``bundle`` may be a directory still being written: the manifest comes as an argument.
    ``tolerance``: the logit limit, by default the precision's ``handoff_logit`` (validation
    raises it where the model's size makes fp32 rounding larger: ``handoff_limit``)."""
    entry = manifest.get("genai") or {}
    if not entry.get("config"):
        return GenaiCheck(not_run=entry.get("why_not", "the bundle has no genai_config.json"))
    if not genai_installed():
        return GenaiCheck(not_run=f"onnxruntime-genai is not installed; {INSTALL}")
    tolerance = TOLERANCES[manifest["precision"]].handoff_logit if tolerance is None else tolerance
    check = GenaiCheck(tolerance=tolerance)
    placement = Placement.of_target(manifest.get("target", {}), 0)
    flavor = entry["flavor"]
    with open_runner(bundle, manifest, flavor, "step", placement) as step, \
            open_runner(bundle, manifest, flavor, "prefill", placement) as prefill:  # fmt: skip
        session = StreamingSession(step, prefill)
        limit = context_length(bundle)  # a stream may not outgrow it: prompts cut to leave room
        try:
            model = load_genai(bundle)
        except GenaiUnavailableError as e:
            check.errors.append(str(e))
            return check
        for prompt in prompts:
            ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
            if limit is not None:
                ids = ids[: limit - min(steps, limit // 2)]
            n = steps if limit is None else min(steps, limit - len(ids))
            try:
                theirs, their_logits = genai_greedy(model, ids, n)
            except GenaiRunError as e:
                check.errors.append(str(e))
                continue
            session.reset()
            logits = session.prefill(ids)
            ours, our_logits = [], []
            for _ in range(len(theirs)):
                our_logits.append(logits)
                ours.append(int(np.argmax(logits)))
                logits = session.step(ours[-1])
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)
            upto = len(theirs) if first is None else first + 1  # after a parting the streams hold other tokens
            diff = float(np.abs(np.stack(our_logits[:upto]) - their_logits[:upto]).max()) if theirs else 0.0
            # parting at a near tie: their token within the tolerance of our best (rounding picked it)
            tie = first is not None and float(our_logits[first].max() - our_logits[first][theirs[first]]) <= tolerance
            check.streams.append({"prompt": len(ids), "tokens": len(theirs), "first_difference": first,
                                  "near_tie": tie, "max_abs_logit": diff})  # fmt: skip
    return check
