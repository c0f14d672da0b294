"""Driving validation of a bundle: the reference, the inputs, the verdict per flavor.

``validate_flavor`` is what ``edgeseq export`` runs before it writes a bundle and what
``edgeseq validate BUNDLE`` runs afterwards: the PyTorch reference (fp32) against one
flavor's step and prefill graphs on held-out prompts, decode steps and a long stream,
the long stream also against an fp64 run of the same model (the judge of drift), and the
held-out gate. ``run_validation`` is the ``validate`` command and what
``edgeseq.testing.assert_bundle_parity`` runs; its ``--golden`` path imports no PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.deploy.bundle import bundle_tokenizer, bundle_widths, read_manifest, width_view
from edgeseq.deploy.progress import CallProgress
from edgeseq.deploy.runtimes import Placement, open_runner, runnable_here, why_not_here
from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import TOLERANCES, GraphIO

VALIDATION_THREADS = 1  # per runtime, unless asked (``set_torch_threads`` says why)


class ValidationFailedError(EdgeseqError):
    """An exported graph disagrees with the reference beyond its tolerance."""

    exit_code = 1


# ---- inputs ------------------------------------------------------------------------------
def heldout_prompts(count: int, vocab_size: int = 264, seed: int = 0) -> list[np.ndarray]:
    """``count`` prompts of different lengths cut from the shipped held-out sample; for a
    model whose vocabulary is not bytes, random ids of the same lengths."""
    from edgeseq.data import PAD, load_sample

    rng = np.random.default_rng(seed)
    lengths = [1, 37, 200, 777, 64, 513][:count]
    if vocab_size <= PAD:
        return [rng.integers(0, vocab_size, (1, n)).astype(np.int64) for n in lengths]
    sample = load_sample()
    starts = rng.integers(0, len(sample) - max(lengths) - 1, len(lengths))
    return [sample[s : s + n][None, :].astype(np.int64) for s, n in zip(starts, lengths)]


def stream_start(config, length: int = 64) -> np.ndarray | None:
    """Held-out text the decode streams start from (then they go on greedily), so that
    quantized graphs are judged in distribution; None (a random token) for other vocabularies."""
    from edgeseq.data import PAD, load_sample

    if config.vocab_size <= PAD:
        return None
    sample = load_sample()
    return sample[len(sample) // 3 : len(sample) // 3 + length][None, :].astype(np.int64)


def validation_prompts(config, count: int) -> list[np.ndarray]:
    limit = config.stream_limit()
    return [p[:, :limit] for p in heldout_prompts(count, config.vocab_size)]


# ---- the reference -----------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """"auto" -> CUDA when there is a GPU, else the CPU; "cuda" without one is refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgeseqError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    return device


def reference_model(bundle: Path, manifest: dict, device: str, override: str | None = None):
    """(fp32 reference model, device) for a bundle: ``reference/`` when the bundle carries
    it, else the source model the manifest names (or ``override``) extracted at the
    bundle's width, refused if its weights are not the ones the bundle was exported from."""
    models, device = reference_models(bundle, manifest, device, override, [manifest["width"]])
    return models[manifest["width"]], device


def reference_models(bundle: Path, manifest: dict, device: str, override: str | None = None,
                     widths: list[str] | None = None) -> tuple[dict[str, Any], str]:  # fmt: skip
    """``reference_model`` at each of ``widths`` (None: every width of an elastic bundle),
    the source loaded once: {width: model}, device."""
    from edgeseq.extract import extract_at
    from edgeseq.families import load_checkpoint
    from edgeseq.width import LayerWidth, full
    from edgeseq.zoo import load_model, weights_digest

    device = resolve_device(device)
    ref = manifest.get("reference", {})
    if override is None and ref.get("embedded"):  # the widest width's model
        source, _ = load_checkpoint(bundle / ref["embedded"], "native")
    else:
        where = override or ref.get("model")
        source, _ = load_model(where, config=None if override else ref.get("config"))
        if weights_digest(source) != ref.get("weights_sha256"):
            named = f"--reference {override}" if override else f"the source model {where or 'mamba2-tiny'}"
            raise EdgeseqError(f"{named} is not the model {bundle} was exported from (weights differ); "
                               "pass the original checkpoint with --reference or re-export the bundle")  # fmt: skip
    models = {}
    for w in bundle_widths(manifest) if widths is None else widths:
        sizes = tuple(map(LayerWidth.of, width_view(manifest, w)["layer_widths"]))
        models[w] = (source if sizes == full(source.config) else extract_at(source, sizes)).float().eval()
    return models, device


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine()


def set_torch_threads(threads: int) -> Callable[[], None]:
    """Give PyTorch ``threads`` intra-op threads; returns what puts the old count back.

    The reference (PyTorch) and the candidate (onnxruntime) take turns call by call, each
    call small: a pool of threads per runtime costs more in hand-offs than it gains, and
    an idle pool spinning on the cores the other runtime needs (onnxruntime's spins after
    every run) made each call several times slower here. Validation gives each one
    thread (``VALIDATION_THREADS``) unless ``--threads`` says otherwise."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    return lambda: torch.set_num_threads(before)


# ---- one flavor --------------------------------------------------------------------------
@dataclass
class FlavorValidation:
    """One flavor's verdict: the step/prefill comparison and the held-out gate."""

    compare: Any  # CompareResult
    heldout: Any = None  # HeldoutResult, or None where not judged
    heldout_skipped: str | None = None

    def __bool__(self) -> bool:
        return bool(self.compare) and (self.heldout is None or bool(self.heldout))

    def summary(self) -> str:
        parts = [self.compare.summary()]
        if self.heldout is not None:
            parts.append(self.heldout.summary())
        return "; ".join(parts)

    def brief(self) -> str:
        """One line for an error: the comparison's first failures, else the held-out verdict."""
        if not self.compare:
            return self.compare.brief()
        return self.heldout.summary() if self.heldout is not None else self.compare.brief()

    def to_dict(self) -> dict:
        return {"passed": bool(self), "summary": self.summary(),
                "heldout": self.heldout.to_dict() if self.heldout is not None else {"skipped": self.heldout_skipped}}  # fmt: skip


def validate_flavor(bundle: Path, manifest: dict, model, flavor: str, steps: int, long_steps: int, prompts: int,
                    device: str, threads: int | None = None, heldout: tuple[int, int] | None = (16, 512),
                    oracle: bool = True, progress: CallProgress | None = None) -> FlavorValidation:  # fmt: skip
    """Judge one flavor's step AND prefill graphs against the reference (``validate_flavors``)."""
    return validate_flavors(bundle, manifest, model, [flavor], steps, long_steps, prompts, device, threads, heldout,
                            oracle, {flavor: progress} if progress else None)[flavor]  # fmt: skip


def validate_flavors(bundle: Path, manifest: dict, model, flavors: list[str], steps: int, long_steps: int,
                     prompts: int, device: str, threads: int | None = None,
                     heldout: tuple[int, int] | None = (16, 512), oracle: bool = True,
                     progress: dict[str, CallProgress] | None = None) -> dict[str, FlavorValidation]:  # fmt: skip
    """Judge each flavor's step AND prefill graphs against the reference: prompts through
    prefill (last logits, every state handed on), the prefill graph against the step graph
    (handoff), decode steps, the long stream's drift against fp64 (``oracle``), and the
    held-out gate (``heldout`` = streams x tokens; None skips it), fed in turns of prefill
    and decode (``edgeseq.validate.heldout.feeding_plan``). The flavors go through the
    streams and the gate together, so the reference and the fp64 oracle run once for all
    (``edgeseq.validate.compare.compare_each``). Candidate runners come from
    ``edgeseq.deploy.runtimes``, placed on the target's execution providers; ``threads``
    (None: ``VALIDATION_THREADS``) is what onnxruntime and PyTorch each get on this machine.
    ``progress[flavor](done, total)`` is called after every call of that flavor's graphs."""
    from edgeseq.runtimes.torch_runner import TorchRunner
    from edgeseq.validate.compare import compare_each

    if not flavors:
        return {}
    precision = manifest["precision"]
    step_io, prefill_io = (GraphIO.from_dict(manifest["io"][k]) for k in ("step", "prefill"))
    limit = model.config.stream_limit()
    if limit is not None:
        steps, long_steps = min(steps, limit), min(long_steps, limit)
    tokenizer = bundle_tokenizer(bundle, manifest)  # the checkpoint's tokenizer.json, else bytes
    if heldout is not None and not tokenizer.fits(model.config.vocab_size):
        heldout, skipped = None, "the model's vocabulary is not bytes and the bundle carries no tokenizer.json"
    else:
        skipped = "not asked" if heldout is None else None
    if heldout is not None and limit is not None:  # a window of tokens + 1 bytes must fit a global attention cache
        heldout = (heldout[0], min(heldout[1], limit - 1))
    placement = Placement.of_target(manifest.get("target", {}), threads or VALIDATION_THREADS)
    ref_step, ref_pre = TorchRunner(model, "step", device=device), TorchRunner(model, "prefill", device=device)
    cands = {f: (open_runner(bundle, manifest, f, "step", placement), open_runner(bundle, manifest, f, "prefill", placement))
             for f in flavors}  # fmt: skip
    fp64 = _oracle_runner(model, chunks=True) if oracle and long_steps else None
    runners = [r for r in (ref_step, ref_pre, fp64, *(r for pair in cands.values() for r in pair)) if r is not None]
    chosen = validation_prompts(model.config, prompts)
    for f, counter in (progress or {}).items():
        _count_calls(counter, cands[f], expected_calls(chosen, steps, long_steps, heldout))
    restore_threads = set_torch_threads(threads or VALIDATION_THREADS)
    for r in runners:
        r.activate()
    try:
        results = compare_each(
            ref_step, [step for step, _ in cands.values()], step_io, tolerance=precision, prompts=chosen,
            tokens=stream_start(model.config), steps=steps, long_steps=long_steps,
            prefill=(ref_pre, [pre for _, pre in cands.values()], prefill_io),
            reference_device=f"{device}:{device_name(device)}", oracle=fp64,
        )  # fmt: skip
        verdicts = {f: FlavorValidation(r, heldout_skipped=skipped) for f, r in zip(cands, results)}
        if heldout is not None:
            _gate(verdicts, (ref_step, ref_pre), cands, (step_io, prefill_io), precision, heldout, tokenizer)
        return verdicts
    finally:
        for r in runners:
            r.deactivate()
        restore_threads()


def _gate(verdicts: dict[str, FlavorValidation], reference: tuple, cands: dict[str, tuple], io: tuple,
          precision: str, heldout: tuple[int, int], tokenizer) -> None:  # fmt: skip
    """The held-out gate of every flavor whose comparison passed (a failed one is already
    no), beside one run of the reference (step, prefill); into ``verdicts``."""
    from edgeseq.tokenizer import TokenizerError
    from edgeseq.validate.heldout import heldout_gates

    judged = [f for f in cands if verdicts[f].compare]
    for f in cands:
        if f not in judged:
            verdicts[f].heldout_skipped = "the comparison failed"
    if not judged:
        return
    try:
        gates = heldout_gates(reference[0], [cands[f][0] for f in judged], io[0], precision, *heldout,
                              prefill=(reference[1], [cands[f][1] for f in judged], io[1]), tokenizer=tokenizer)  # fmt: skip
    except TokenizerError as e:  # its vocabulary cannot be put per byte: the comparison alone judges
        for f in judged:
            verdicts[f].heldout_skipped = str(e)
        return
    for f, gate in zip(judged, gates):
        verdicts[f].heldout = gate


def expected_calls(prompts: list[np.ndarray], steps: int, long_steps: int, heldout: tuple[int, int] | None) -> int:
    """Candidate graph calls ``validate_flavor`` makes when everything passes: each prompt
    through prefill, through prefill and step again (handoff), the streams, the gate."""
    from edgeseq.validate.heldout import feeding_plan

    handoff = sum(p.shape[1] + 1 for p in prompts)
    gate = 0 if heldout is None else sum(1 if k == "prefill" else b - a for k, a, b in feeding_plan(heldout[1], True))
    return len(prompts) + handoff + steps + long_steps + gate


def _count_calls(progress: CallProgress, runners, total: int) -> None:
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress(min(done, total), total)

    for r in runners:
        r.watch(tick)


def _oracle_runner(model, chunks: bool = False):
    """The same model in fp64 on the CPU (its own copy, made on activate): the judge of the
    long stream's drift. Which device runs it does not matter: fp64 runs agree to ~1e-13.
    ``chunks``: its prefill with every position's logits, which verifies the stream a chunk
    per call (``edgeseq.validate.streams.run_verified_stream``) instead of a step per call."""
    from edgeseq.runtimes.torch_runner import TorchRunner

    if chunks:
        return TorchRunner(model, "prefill", device="cpu", dtype="float64", all_logits=True)
    return TorchRunner(model, "step", device="cpu", dtype="float64")


# ---- edgeseq validate --------------------------------------------------------------------
def _write_outputs(result, flavor: str, report: Path | None, plot: Path | None, many: bool) -> None:
    from edgeseq.validate import plot_drift, write_report

    def named(p: Path) -> Path:
        return p.with_name(f"{flavor}-{p.name}") if many else p

    if report:
        write_report(result, named(report))
    if plot and "long_stream" in result.phases:
        plot_drift(result, named(plot))


def run_validation(bundle, flavor, steps, long_steps, device, report, plot, save_golden, golden,
                   reference: str | None = None, heldout: tuple[int, int] | None = (16, 512),
                   progress: Callable[[str], CallProgress] | None = None) -> dict:  # fmt: skip
    """``edgeseq validate`` and ``edgeseq.testing.assert_bundle_parity``: every flavor that
    runs here, against the golden file or with ``validate_flavor``; ``progress(flavor)``
    gives each flavor's call counter. Returns the outcome ``--json`` prints."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    flavors = [flavor] if flavor else manifest["flavors"]
    precision = manifest["precision"]
    outcome = {"bundle": str(bundle), "precision": precision, "flavors": {}, "not_run": {}, "passed": True}
    runnable = [f for f in flavors if runnable_here(f)]
    outcome["not_run"] = {f: why_not_here(f) for f in flavors if not runnable_here(f)}
    placement = Placement.of_target(manifest.get("target", {}), 0)  # all of this machine's cores
    if golden:
        from edgeseq.validate import compare_golden

        outcome["reference"] = f"golden file {golden}"
        for f in runnable:
            with open_runner(bundle, manifest, f, "step", placement) as cand, \
                    open_runner(bundle, manifest, f, "prefill", placement) as cand_pre:  # fmt: skip
                result = compare_golden(cand, golden, tolerance=precision, prefill_candidate=cand_pre)
            _record(outcome, f, result, result)
            _write_outputs(result, f, report, plot, len(runnable) > 1)
        return outcome
    model, device = reference_model(bundle, manifest, device, reference)
    outcome["reference"] = f"PyTorch fp32 on {device}; drift judged against fp64 on the CPU"
    if save_golden:  # what validate_flavor's comparison runs, kept small (edgeseq.validate.golden)
        from contextlib import nullcontext

        from edgeseq.runtimes.torch_runner import TorchRunner
        from edgeseq.validate import record_golden
        from edgeseq.validate import save_golden as write_golden

        limit = model.config.stream_limit() or max(steps, long_steps)
        step_io, prefill_io = (GraphIO.from_dict(manifest["io"][k]) for k in ("step", "prefill"))
        with TorchRunner(model, "step", device=device) as ref, TorchRunner(model, "prefill", device=device) as pre, \
                (_oracle_runner(model) if long_steps else nullcontext()) as fp64:  # fmt: skip
            g = record_golden(ref, step_io, prompts=validation_prompts(model.config, 4), tokens=stream_start(model.config),
                              steps=min(steps, limit), long_steps=min(long_steps, limit), prefill=(pre, prefill_io),
                              oracle=fp64, info={"bundle": str(bundle), "device": device})  # fmt: skip
        write_golden(save_golden, g, overwrite=True)
        outcome["golden"] = str(save_golden)
    counters = {f: c for f in runnable if (c := progress(f) if progress else None)}
    results = validate_flavors(bundle, manifest, model, runnable, steps, long_steps, 4, device, heldout=heldout,
                               progress=counters)  # fmt: skip
    for f, result in results.items():
        _record(outcome, f, result, result.compare, result.to_dict()["heldout"])
        _write_outputs(result.compare, f, report, plot, len(runnable) > 1)
    _check_genai(outcome, bundle, manifest, validation_prompts(model.config, 4), steps, handoff_limit(precision, results))
    return outcome


def handoff_limit(precision: str, results: dict[str, FlavorValidation]) -> float | None:
    """The precision's ``handoff_logit`` raised by the largest rounding the reference showed
    against fp64 in ``results`` (``Tolerance.beside_rounding``): the limit for two runs of
    the bundle's own graphs, as onnxruntime-genai's check holds them."""
    tol = TOLERANCES[precision]
    for result in results.values():
        if rounding := result.compare.settings.get("rounding"):
            tol = tol.beside_rounding(rounding["logit"], rounding["state"])
    return tol.handoff_logit


def _check_genai(outcome: dict, bundle: Path, manifest: dict, prompts: list[np.ndarray], steps: int,
                 tolerance: float | None = None) -> None:  # fmt: skip
    """The bundle through onnxruntime-genai (``edgeseq.deploy.genai_check``), into the outcome."""
    from edgeseq.deploy.genai_check import STEPS, check_genai

    check = check_genai(bundle, manifest, prompts, min(steps, STEPS), tolerance)
    outcome["genai"] = check.to_dict()
    outcome["passed"] &= bool(check)


def _record(outcome: dict, flavor: str, verdict, compared, heldout: dict | None = None) -> None:
    """``verdict`` decides (a CompareResult, or FlavorValidation with the held-out gate);
    ``compared`` is the comparison whose statistics the outcome carries."""
    entry = {"passed": bool(verdict), "summary": verdict.summary(), "result": compared.to_dict()}
    outcome["flavors"][flavor] = entry | ({"heldout": heldout} if heldout is not None else {})
    outcome["passed"] &= bool(verdict)
