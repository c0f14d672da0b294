"""The main job: load -> extract -> export -> validate -> bundle.

``export_bundle`` writes nothing unless every stage succeeds: the bundle is assembled in
a temporary directory beside the output and renamed into place at the end. Validation
runs the PyTorch reference (fp32, on CUDA when there is a GPU) against every graph
onnxruntime can run here, on held-out prompts, ``steps`` decode steps with the state
fed back and one long stream; graphs it cannot run here are named in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bundle import NOT_RUNNABLE, ONNXRUNTIME_FLAVORS, device_readme, write_graph, write_manifest
from edgeseq.errors import EdgeseqError
from edgeseq.export.graphs import build_graph
from edgeseq.export.spec import graph_io
from edgeseq.extract import extract
from edgeseq.io import atomic_dir
from edgeseq.targets import Target, get_target
from edgeseq.width import WidthSpec, resolve


class ValidationFailedError(EdgeseqError):
    """An exported graph disagrees with the reference beyond its tolerance."""

    exit_code = 1


@dataclass
class ExportRequest:
    model: str | None
    target: str
    width: WidthSpec
    output: Path
    flavor: str | None = None  # None: the target's flavors
    precision: str = "fp32"
    steps: int = 256
    long_steps: int = 4096
    prompts: int = 4
    validate: bool = True
    overwrite: bool = False
    threads: int | None = None  # onnxruntime intra-op threads during validation (None: all cores)


Progress = Callable[[str, str], None]  # (stage, detail)


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


def stream_limit(config) -> int | None:
    """Longest stream a model takes: a global attention cache holds max_context tokens."""
    if any(s.mixer == "attention" and s.window is None for s in config.layers):
        return config.attention.max_context
    return None


def validation_prompts(config, count: int) -> list[np.ndarray]:
    limit = stream_limit(config)
    return [p[:, :limit] for p in heldout_prompts(count, config.vocab_size)]


def reference_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def validate_flavor(bundle: Path, model, flavor: str, precision: str, steps: int, long_steps: int, prompts: int,
                    device: str, threads: int | None = None):
    """Compare the bundle's graphs of one flavor with the reference; returns CompareResult."""
    from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner
    from edgeseq.runtimes.torch_runner import TorchRunner
    from edgeseq.validate import compare

    step_io, prefill_io = graph_io(model.config, "step"), graph_io(model.config, "prefill")
    limit = stream_limit(model.config)
    if limit is not None:
        steps, long_steps = min(steps, limit), min(long_steps, limit)
    runners = [
        TorchRunner(model, "step", device=device),
        OnnxRuntimeRunner(bundle / flavor / "step.onnx", io=step_io, intra_op_threads=threads),
        TorchRunner(model, "prefill", device=device),
        OnnxRuntimeRunner(bundle / flavor / "prefill.onnx", io=prefill_io, intra_op_threads=threads),
    ]
    for r in runners:
        r.activate()
    try:
        ref_step, cand_step, ref_pre, cand_pre = runners
        return compare(
            ref_step, cand_step, step_io, tolerance=precision,
            prompts=validation_prompts(model.config, prompts),
            steps=steps, long_steps=long_steps, prefill=(ref_pre, cand_pre, prefill_io),
            reference_device=f"{device}:{_device_name(device)}",
        )  # fmt: skip
    finally:
        for r in runners:
            r.deactivate()


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine()


def export_bundle(req: ExportRequest, progress: Progress = lambda stage, detail: None) -> dict[str, Any]:
    """Run every stage; returns the manifest written to ``req.output``."""
    from edgeseq.families.native import Native
    from edgeseq.validate import plot_drift, write_report
    from edgeseq.zoo import load_model

    target: Target = get_target(req.target)
    progress("load", f"{req.model or 'default model'}")
    full, metadata = load_model(req.model)
    widths = resolve(full.config, req.width)  # a width that cannot be honoured fails here
    progress("extract", f"width {req.width}")
    model = extract(full, req.width).float().eval()
    flavors = [req.flavor] if req.flavor else list(target.flavors)
    graphs = {}
    for flavor in flavors:
        progress("export", flavor)
        graphs[flavor] = {kind: build_graph(model, kind, flavor) for kind in ("step", "prefill")}
    with atomic_dir(req.output, overwrite=req.overwrite) as tmp:
        for flavor, kinds in graphs.items():
            for kind, proto in kinds.items():
                write_graph(tmp / flavor / f"{kind}.onnx", proto)
        (tmp / "reference").mkdir()
        Native.write(model, tmp / "reference", {"source": metadata.get("name"), "width": str(req.width)})
        validation = {"ran": {}, "not_run": {}}
        if req.validate:
            device = reference_device()
            for flavor in flavors:
                if flavor not in ONNXRUNTIME_FLAVORS:
                    validation["not_run"][flavor] = NOT_RUNNABLE
                    continue
                progress("validate", f"{flavor} against the {device} reference")
                result = validate_flavor(tmp, model, flavor, req.precision, req.steps, req.long_steps, req.prompts,
                                         device, req.threads)
                (tmp / "validation").mkdir(exist_ok=True)
                write_report(result, tmp / "validation" / f"{flavor}.json")
                plot_drift(result, tmp / "validation" / f"{flavor}_drift.png")
                validation["ran"][flavor] = {"passed": bool(result), "summary": result.summary(), "reference": device}
                if not result:
                    raise ValidationFailedError(f"{flavor} graphs fail validation: {result.summary()}; nothing was written")
        validation["summary"] = "; ".join(f"{f}: {v['summary']}" for f, v in validation["ran"].items()) or "not run"
        progress("bundle", str(req.output))
        manifest = {
            "model_name": metadata.get("name"),
            "source": {k: v for k, v in metadata.items() if k in ("name", "format", "trained", "steps")},
            "config": model.config.to_dict(),
            "width": str(req.width),
            "layer_widths": [{"heads": w.heads, "d_mlp": w.d_mlp} for w in widths],
            "flavors": flavors,
            "precision": req.precision,
            "target": target.to_dict(),
            "graphs": {f: {k: f"{f}/{k}.onnx" for k in kinds} for f, kinds in graphs.items()},
            "io": {kind: graph_io(model.config, kind).to_dict() for kind in ("step", "prefill")},
            "reference": "reference",
            "validation": validation,
        }
        (tmp / "README.md").write_text(device_readme(manifest))
        manifest = write_manifest(tmp, manifest)
    return manifest
