"""What ``edgeseq validate BUNDLE`` does. The ``--golden`` path imports no PyTorch."""

from __future__ import annotations

from pathlib import Path

from edgeseq.bundle import NOT_RUNNABLE, ONNXRUNTIME_FLAVORS, graph_path, read_manifest
from edgeseq.export.spec import GraphIO



def _reference(bundle: Path, device: str):
    import torch

    from edgeseq.families import load_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from edgeseq.errors import EdgeseqError

        raise EdgeseqError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    model, _ = load_checkpoint(bundle / "reference", "native")
    return model.float().eval(), device


def _write_outputs(result, flavor: str, report: Path | None, plot: Path | None, many: bool) -> None:
    from edgeseq.validate import plot_drift, write_report

    def named(p: Path) -> Path:
        return p.with_name(f"{flavor}-{p.name}") if many else p

    if report:
        write_report(result, named(report))
    if plot and "long_stream" in result.phases:
        plot_drift(result, named(plot))


def run_validation(bundle, flavor, steps, long_steps, device, report, plot, save_golden, golden) -> dict:
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    flavors = [flavor] if flavor else manifest["flavors"]
    precision = manifest["precision"]
    outcome = {"bundle": str(bundle), "precision": precision, "flavors": {}, "not_run": {}, "passed": True}
    runnable = [f for f in flavors if f in ONNXRUNTIME_FLAVORS]
    outcome["not_run"] = {f: NOT_RUNNABLE for f in flavors if f not in ONNXRUNTIME_FLAVORS}
    if golden:
        from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner
        from edgeseq.validate import compare_golden

        outcome["reference"] = f"golden file {golden}"
        io = GraphIO.from_dict(manifest["io"]["step"])
        for f in runnable:
            with OnnxRuntimeRunner(graph_path(bundle, manifest, f, "step"), io=io) as cand:
                result = compare_golden(cand, golden, tolerance=precision)
            _record(outcome, f, result)
            _write_outputs(result, f, report, plot, len(runnable) > 1)
        return outcome
    from edgeseq.pipeline import stream_limit, validate_flavor, validation_prompts

    model, device = _reference(bundle, device)
    outcome["reference"] = f"PyTorch fp32 on {device}"
    if save_golden:
        from edgeseq.export.spec import graph_io
        from edgeseq.runtimes.torch_runner import TorchRunner
        from edgeseq.validate import record_golden, save_golden as write_golden

        with TorchRunner(model, "step", device=device) as ref:
            g = record_golden(ref, graph_io(model.config, "step"), prompts=validation_prompts(model.config, 4), steps=min(steps, stream_limit(model.config) or steps),
                              info={"bundle": str(bundle), "device": device})
        write_golden(save_golden, g, overwrite=True)
        outcome["golden"] = str(save_golden)
    for f in runnable:
        result = validate_flavor(bundle, model, f, precision, steps, long_steps, 4, device)
        _record(outcome, f, result)
        _write_outputs(result, f, report, plot, len(runnable) > 1)
    return outcome


def _record(outcome: dict, flavor: str, result) -> None:
    outcome["flavors"][flavor] = {"passed": bool(result), "summary": result.summary(), "result": result.to_dict()}
    outcome["passed"] &= bool(result)
