"""What ``edgeseq validate BUNDLE`` does. The ``--golden`` path imports no PyTorch."""

from __future__ import annotations

from pathlib import Path

from edgeseq.bundle import NOT_RUNNABLE, graph_path, ort_plugins, ort_runnable, read_manifest
from edgeseq.export.spec import GraphIO


def reference_model(bundle: Path, manifest: dict, device: str, override: str | None = None):
    """(fp32 reference model, device) for a bundle: ``reference/`` when the bundle carries
    it, else the source model the manifest names (or ``override``) extracted at the
    bundle's width, refused if its weights are not the ones the bundle was exported from."""
    import torch

    from edgeseq.errors import EdgeseqError
    from edgeseq.extract import extract
    from edgeseq.families import load_checkpoint
    from edgeseq.width import WidthSpec
    from edgeseq.zoo import load_model, weights_digest

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgeseqError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    ref = manifest.get("reference", {})
    if override is None and ref.get("embedded"):
        model, _ = load_checkpoint(bundle / ref["embedded"], "native")
        return model.float().eval(), device
    source = override or ref.get("model")
    full, _ = load_model(source)
    if weights_digest(full) != ref.get("weights_sha256"):
        where = f"--reference {override}" if override else f"the source model {source or 'mamba2-tiny'}"
        raise EdgeseqError(f"{where} is not the model {bundle} was exported from (weights differ); "
                           "pass the original checkpoint with --reference or re-export the bundle")
    return extract(full, WidthSpec.parse(manifest["width"])).float().eval(), device


def _write_outputs(result, flavor: str, report: Path | None, plot: Path | None, many: bool) -> None:
    from edgeseq.validate import plot_drift, write_report

    def named(p: Path) -> Path:
        return p.with_name(f"{flavor}-{p.name}") if many else p

    if report:
        write_report(result, named(report))
    if plot and "long_stream" in result.phases:
        plot_drift(result, named(plot))


def run_validation(bundle, flavor, steps, long_steps, device, report, plot, save_golden, golden,
                   reference: str | None = None) -> dict:
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    flavors = [flavor] if flavor else manifest["flavors"]
    precision = manifest["precision"]
    outcome = {"bundle": str(bundle), "precision": precision, "flavors": {}, "not_run": {}, "passed": True}
    runnable = [f for f in flavors if ort_runnable(f)]
    outcome["not_run"] = {f: NOT_RUNNABLE for f in flavors if not ort_runnable(f)}
    if golden:
        from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner
        from edgeseq.validate import compare_golden

        outcome["reference"] = f"golden file {golden}"
        io = GraphIO.from_dict(manifest["io"]["step"])
        for f in runnable:
            with OnnxRuntimeRunner(graph_path(bundle, manifest, f, "step"), io=io, plugins=ort_plugins(f)) as cand:
                result = compare_golden(cand, golden, tolerance=precision)
            _record(outcome, f, result, result)
            _write_outputs(result, f, report, plot, len(runnable) > 1)
        return outcome
    from edgeseq.pipeline import stream_limit, validate_flavor, validation_prompts

    model, device = reference_model(bundle, manifest, device, reference)
    outcome["reference"] = f"PyTorch fp32 on {device}"
    if save_golden:
        from edgeseq.export.spec import graph_io
        from edgeseq.runtimes.torch_runner import TorchRunner
        from edgeseq.validate import record_golden
        from edgeseq.validate import save_golden as write_golden

        with TorchRunner(model, "step", device=device) as ref:
            g = record_golden(ref, graph_io(model.config, "step"), prompts=validation_prompts(model.config, 4), steps=min(steps, stream_limit(model.config) or steps),
                              info={"bundle": str(bundle), "device": device})
        write_golden(save_golden, g, overwrite=True)
        outcome["golden"] = str(save_golden)
    for f in runnable:
        result = validate_flavor(bundle, model, f, precision, steps, long_steps, 4, device,
                                 graphs=manifest["graphs"][f])
        _record(outcome, f, result, result.compare, result.to_dict()["heldout"])
        _write_outputs(result.compare, f, report, plot, len(runnable) > 1)
    return outcome


def _record(outcome: dict, flavor: str, verdict, compared, heldout: dict | None = None) -> None:
    """``verdict`` decides (a CompareResult, or FlavorValidation with the held-out gate);
    ``compared`` is the comparison whose statistics the outcome carries."""
    entry = {"passed": bool(verdict), "summary": verdict.summary(), "result": compared.to_dict()}
    outcome["flavors"][flavor] = entry | ({"heldout": heldout} if heldout is not None else {})
    outcome["passed"] &= bool(verdict)
