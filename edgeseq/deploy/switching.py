"""Validating an elastic bundle's width switches: a stream that switches, against the
reference switching alike.

Both sides are ``StreamingSession``s with the same widths and the same switching code
(``edgeseq.runtimes.elastic``): the candidate over the bundle's graphs, the reference over
``TorchRunner``s of each width's extracted model. The stream prefills a held-out prompt
at the widest width, then decodes ``LEG`` greedy steps (the reference's choice fed to
both) after each switch of ``schedule``: to the narrowest width, back to the widest with
zeros for the new heads, to the next narrower, back with a replay, and down through every
width in turn. Each logit row is compared, the replay's too, against the precision's
limits (``edgeseq.export.spec.TOLERANCES``): for fp32 the max abs error on every logit,
raised where the reference itself sits further from an fp64 run of the same switching
stream (``Tolerance.beside_rounding``, as every other fp32 check); for reduced precisions
top-1 agreement and KL over the whole stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.deploy.bundle import bundle_widths, width_view
from edgeseq.deploy.runtimes import Placement
from edgeseq.deploy.validation import validation_prompts
from edgeseq.export.spec import TOLERANCES
from edgeseq.runtimes.elastic import WidthGraphs
from edgeseq.runtimes.session import StreamingSession
from edgeseq.validate.metrics import abs_error, kl_per_row, top1_matches
from edgeseq.width import LayerWidth

LEG = 24  # greedy steps after each switch


def schedule(widths: list[str]) -> list[tuple[str, str]]:
    """(width, widen policy) after the first leg at the widest: both directions, both policies."""
    wide, rest = widths[0], widths[1:]
    legs = [(widths[-1], "zeros"), (wide, "zeros"), (rest[0], "zeros"), (wide, "replay")]
    return legs + [(w, "zeros") for w in rest] + [(wide, "replay")]


@dataclass
class SwitchResult:
    precision: str
    legs: list[dict[str, Any]] = field(default_factory=list)  # per leg: width, policy, positions, max abs, top-1, KL
    rounding: float = float("nan")  # fp32: the reference's own max abs logit distance from fp64 on the stream

    @property
    def limit(self) -> float | None:
        """fp32's max abs logit limit, raised where the reference sits further from fp64."""
        return TOLERANCES[self.precision].beside_rounding(self.rounding, math.nan).max_abs_logit

    def _overall(self, key: str) -> float:
        return sum(leg[key] * leg["positions"] for leg in self.legs) / max(1, sum(leg["positions"] for leg in self.legs))

    def __bool__(self) -> bool:
        """fp32: every logit within the step limit; reduced precisions: top-1 and KL over the
        whole stream (a leg of 24 tokens is too few to judge a rate on)."""
        tol = TOLERANCES[self.precision]
        if not tol.held_out_only:
            return all(leg["max_abs_logit"] <= self.limit for leg in self.legs)
        return self._overall("top1") >= tol.top1_agreement and self._overall("kl") <= tol.kl

    def brief(self) -> str:
        worst = max(self.legs, key=lambda leg: leg["max_abs_logit"])
        limit = "" if TOLERANCES[self.precision].held_out_only else f" (limit {self.limit:.2g})"
        return (f"{'PASS' if self else 'FAIL'}: {len(self.legs)} legs, {sum(leg['positions'] for leg in self.legs)} "
                f"positions: max abs logit {worst['max_abs_logit']:.2e}{limit} after {worst['from']} -> "
                f"{worst['width']} ({worst['policy']}), top-1 {self._overall('top1'):.3f}, KL {self._overall('kl'):.2e}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), "summary": self.brief(), "rounding": self.rounding, "legs": self.legs}


def validate_switching(root: Path, manifest: dict, models: dict[str, Any], flavor: str, device: str = "cpu",
                       leg: int = LEG) -> SwitchResult:  # fmt: skip
    """Run the switching stream through the bundle at ``root`` (``manifest`` may be one not
    yet written), through the reference ``models`` (width label -> extracted model) and,
    for fp32, through their fp64 copies on the CPU (the reference's own rounding)."""
    from edgeseq.config import ModelConfig

    widths = bundle_widths(manifest)
    config = ModelConfig.from_dict(manifest["config"])
    result = SwitchResult(manifest["precision"])
    oracle = not TOLERANCES[result.precision].held_out_only
    sessions = [_reference(manifest, models, device, "float32")]
    if oracle:
        sessions.append(_reference(manifest, models, "cpu", "float64"))
    placement = Placement.of_target(manifest.get("target", {}), 0)
    sessions.append(StreamingSession.open(root, manifest, flavor, placement))
    prompt = validation_prompts(config, 1)[0]
    legs = [(widths[0], "zeros"), *schedule(widths)]
    if (limit := config.stream_limit()) is not None:  # a global attention cache: the stream must fit it
        prompt = prompt[:, : limit // 2]
        leg = max(1, min(leg, (limit - prompt.shape[-1]) // len(legs)))
    rounding = 0.0
    try:
        rows = [[s.prefill(prompt) for s in sessions]]
        current = widths[0]
        for width, policy in legs:
            replayed = [s.set_width(width, policy) for s in sessions]
            if replayed[0] is not None:  # the replay's own logits, compared too
                rows.append(replayed)
            for _ in range(leg):
                token = int(np.argmax(rows[-1][0]))
                rows.append([s.step(token) for s in sessions])
            result.legs.append({"from": current, "width": width, "policy": policy,
                                **_errors([(r[0], r[-1]) for r in rows])})  # fmt: skip
            if oracle:
                rounding = max(rounding, max(float(np.abs(r[0] - r[1]).max()) for r in rows[1:]))
            rows, current = rows[-1:], width
    finally:
        for s in sessions:
            s.close()
    result.rounding = rounding if oracle else math.nan
    return result


def _reference(manifest: dict, models: dict[str, Any], device: str, dtype: str) -> StreamingSession:
    """A session over TorchRunners of every width's model, switching as the bundle's does."""
    from edgeseq.config import ModelConfig
    from edgeseq.runtimes.torch_runner import TorchRunner

    members = []
    for w in bundle_widths(manifest):
        layers = tuple(map(LayerWidth.of, width_view(manifest, w)["layer_widths"]))
        step, prefill = (TorchRunner(models[w], kind, device, dtype=dtype) for kind in ("step", "prefill"))
        step.activate()
        prefill.activate()
        members.append(WidthGraphs(w, step, prefill, layers))
    return StreamingSession.of_widths(members, ModelConfig.from_dict(manifest["config"]))


def _errors(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Statistics of the rows after the first (the leg's start, compared in the leg before)."""
    ref, cand = (np.stack([p[k] for p in pairs[1:]]) for k in (0, 1))
    return {
        "positions": len(ref),
        "max_abs_logit": float(abs_error(ref, cand).max()),
        "top1": float(top1_matches(ref, cand).mean()),
        "kl": float(kl_per_row(ref, cand).mean()),
    }


def validate_elastic(outcome: dict, bundle: Path, flavor: str | None, steps: int, long_steps: int, device: str,
                     reference: str | None = None, heldout: tuple[int, int] | None = (16, 512),
                     progress=None) -> dict:  # fmt: skip
    """``edgeseq validate`` of an elastic bundle after ``run_validation`` checked its widest
    width: every narrower width (entries ``<flavor>@<width>``) and the switching stream
    (``<flavor> switching``), into ``outcome``. A bundle of one width is left as it was."""
    from edgeseq.deploy.bundle import read_manifest
    from edgeseq.deploy.runtimes import runnable_here
    from edgeseq.deploy.validation import _record, reference_models, validate_flavors

    manifest = read_manifest(bundle)
    widths = bundle_widths(manifest)
    if len(widths) < 2:
        return outcome
    runnable = [f for f in ([flavor] if flavor else manifest["flavors"]) if runnable_here(f)]
    models, device = reference_models(bundle, manifest, device, reference)
    for w in widths[1:]:
        view = width_view(manifest, w)
        counters = {f: c for f in runnable if (c := progress(f"{f}@{w}") if progress else None)}
        results = validate_flavors(bundle, view, models[w], runnable, steps, long_steps, 4, device, heldout=heldout,
                                   progress=counters)  # fmt: skip
        for f, result in results.items():
            _record(outcome, f"{f}@{w}", result, result.compare, result.to_dict()["heldout"])
    for f in runnable:
        switching = validate_switching(bundle, manifest, models, f, device)
        outcome["flavors"][f"{f} switching"] = {"passed": bool(switching), "summary": switching.brief(),
                                                "result": switching.to_dict()}  # fmt: skip
        outcome["passed"] &= bool(switching)
    return outcome
