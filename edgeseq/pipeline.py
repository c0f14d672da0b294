"""The main job: load -> plan -> extract -> export -> quantize -> validate -> bundle.

``export_bundle`` writes nothing unless every stage succeeds: the bundle is assembled in
a temporary directory beside the output and renamed into place at the end. Without a
width, the sizing model (``edgeseq.targets.plan``) picks the widest configuration that
fits the target; with one, a configuration that cannot fit is refused. Validation runs
the PyTorch reference (fp32, on CUDA when there is a GPU) against every graph
onnxruntime can run here, on held-out prompts, ``steps`` decode steps with the state fed
back and one long stream, and the held-out gate (bits per byte, top-1, KL on held-out
text; what quantized bundles are judged on); graphs it cannot run here are named in the manifest.

The bundle is what ships: graphs, manifest, README. The reference is rebuilt from the
source model the manifest names (its weights digest is checked), or carried in
``reference/`` with ``embed_reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bundle import (
    NOT_RUNNABLE,
    device_readme,
    ort_plugins,
    ort_runnable,
    read_manifest,
    write_graph,
    write_manifest,
)
from edgeseq.errors import EdgeseqError
from edgeseq.export.graphs import SPLIT_K, build_graph
from edgeseq.export.quantize import QuantOptions, quantize_graph
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
    width: WidthSpec | None  # None: the sizing model picks
    output: Path
    flavor: str | None = None  # None: the target's flavors
    precision: str | None = None  # None: the target's default (or the sizing model's pick)
    steps: int = 256
    long_steps: int = 4096
    prompts: int = 4
    validate: bool = True
    overwrite: bool = False
    threads: int | None = None  # onnxruntime intra-op threads during validation (None: all cores)
    memory_budget: int | None = None  # bytes for the model; None: the target's
    min_tokens_per_s: float | None = None
    int4_block_size: int = 32
    embed_reference: bool = False
    heldout: tuple[int, int] = (16, 512)  # bits-per-byte gate: streams x tokens
    reference_device: str = "auto"  # where the PyTorch reference runs: auto (CUDA when there is one), cpu, cuda


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


def stream_start(config, length: int = 64) -> np.ndarray | None:
    """Held-out text the decode streams start from (then they go on greedily), so that
    quantized graphs are judged in distribution; None (a random token) for other vocabularies."""
    from edgeseq.data import PAD, load_sample

    if config.vocab_size <= PAD:
        return None
    sample = load_sample()
    return sample[len(sample) // 3 : len(sample) // 3 + length][None, :].astype(np.int64)


def validation_prompts(config, count: int) -> list[np.ndarray]:
    limit = stream_limit(config)
    return [p[:, :limit] for p in heldout_prompts(count, config.vocab_size)]


def reference_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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

    def to_dict(self) -> dict:
        return {"passed": bool(self), "summary": self.summary(),
                "heldout": self.heldout.to_dict() if self.heldout is not None else {"skipped": self.heldout_skipped}}


def validate_flavor(bundle: Path, model, flavor: str, precision: str, steps: int, long_steps: int, prompts: int,
                    device: str, threads: int | None = None, heldout: tuple[int, int] | None = (16, 512),
                    graphs: dict[str, str] | None = None) -> FlavorValidation:
    """Compare the bundle's graphs of one flavor with the reference, and judge held-out
    bits per byte, top-1 and KL (``heldout`` = streams x tokens; None skips it)."""
    from edgeseq.data import PAD
    from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner
    from edgeseq.runtimes.torch_runner import TorchRunner
    from edgeseq.validate import compare
    from edgeseq.validate.heldout import heldout_gate

    step_io, prefill_io = graph_io(model.config, "step"), graph_io(model.config, "prefill")
    paths = graphs or {kind: f"{flavor}/{kind}.onnx" for kind in ("step", "prefill")}
    limit = stream_limit(model.config)
    if limit is not None:
        steps, long_steps = min(steps, limit), min(long_steps, limit)
    runners = [
        TorchRunner(model, "step", device=device),
        OnnxRuntimeRunner(bundle / paths["step"], io=step_io, intra_op_threads=threads, plugins=ort_plugins(flavor)),
        TorchRunner(model, "prefill", device=device),
        OnnxRuntimeRunner(bundle / paths["prefill"], io=prefill_io, intra_op_threads=threads, plugins=ort_plugins(flavor)),
    ]
    for r in runners:
        r.activate()
    try:
        ref_step, cand_step, ref_pre, cand_pre = runners
        result = compare(
            ref_step, cand_step, step_io, tolerance=precision,
            prompts=validation_prompts(model.config, prompts), tokens=stream_start(model.config),
            steps=steps, long_steps=long_steps, prefill=(ref_pre, cand_pre, prefill_io),
            reference_device=f"{device}:{_device_name(device)}",
        )  # fmt: skip
        if heldout is None:
            return FlavorValidation(result, heldout_skipped="not asked")
        if model.config.vocab_size <= PAD:
            return FlavorValidation(result, heldout_skipped="the model's vocabulary is not bytes")
        streams, tokens = heldout
        if limit is not None:  # a window of tokens + 1 bytes must fit a global attention cache
            tokens = min(tokens, limit - 1)
        return FlavorValidation(result, heldout_gate(ref_step, cand_step, step_io, precision, streams, tokens))
    finally:
        for r in runners:
            r.deactivate()


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine()


@dataclass
class Plan:
    """What the sizing stage decided, for the manifest and the progress display."""

    width: WidthSpec
    precision: str
    row: dict
    reasons: list[str] = field(default_factory=list)


def plan_export(config, target: Target, req: ExportRequest) -> Plan:
    """Pick (no width) or check (a width) the configuration against the target."""
    from edgeseq.targets.plan import check_fits, choose, plan

    budget = req.memory_budget
    if req.width is None:
        rows = plan(config, target, min_tokens_per_s=req.min_tokens_per_s, memory_bytes=budget)
        if req.precision:
            _check_supported(target, req.precision)
            rows = [r for r in rows if r.precision == req.precision]
        choice = choose(rows, target, budget, req.min_tokens_per_s)
        return Plan(WidthSpec.parse(choice.row.width), choice.row.precision, choice.row.to_dict(), list(choice.reasons))
    precision = req.precision or target.default_precision
    rows = plan(config, target, memory_bytes=budget, widths=[str(req.width)])
    row = check_fits(rows, str(req.width), precision, target, budget)
    why = f"width {req.width} at {precision} as asked; peak {row.peak_bytes / 2**20:,.1f} MiB fits {target.name}"
    return Plan(req.width, precision, row.to_dict(), [why])


def _check_supported(target: Target, precision: str) -> None:
    if precision not in target.precisions:
        raise EdgeseqError(f"{target.name} does not run {precision}; use one of {', '.join(target.precisions)}")


def quant_options(target: Target, precision: str, block_size: int = 32) -> QuantOptions:
    return QuantOptions(precision, int8_preset=target.int8_preset, block_size=block_size)


def export_bundle(req: ExportRequest, progress: Progress = lambda stage, detail: None) -> dict[str, Any]:
    """Run every stage; returns the manifest written to ``req.output``."""
    from edgeseq.zoo import load_model, weights_digest

    target: Target = get_target(req.target)
    progress("load", f"{req.model or 'default model'}")
    full, metadata = load_model(req.model)
    if req.width is not None:
        resolve(full.config, req.width)  # a width that cannot be honoured fails here, before sizing
    chosen = plan_export(full.config, target, req)
    for reason in chosen.reasons:
        progress("plan", reason)
    progress("extract", f"width {chosen.width}")
    model = extract(full, chosen.width).float().eval()
    flavors = [req.flavor] if req.flavor else list(target.flavors)
    options = quant_options(target, chosen.precision, req.int4_block_size)
    graphs = {}
    for flavor in flavors:
        progress("export", flavor)
        split = SPLIT_K if chosen.precision == "fp32" else None  # quantizers need the plain MatMuls
        graphs[flavor] = {kind: build_graph(model, kind, flavor, split_k=split) for kind in ("step", "prefill")}
        if chosen.precision != "fp32":
            progress("quantize", f"{flavor}: {options.describe()}")
            graphs[flavor] = {kind: quantize_graph(g, options) for kind, g in graphs[flavor].items()}
    source = {
        "model": req.model if req.model is None or not Path(req.model).exists() else str(Path(req.model).resolve()),
        "name": metadata.get("name"), "width": str(chosen.width), "weights_sha256": weights_digest(full),
    }  # fmt: skip
    manifest = {
        "model_name": metadata.get("name"),
        "source": {k: v for k, v in metadata.items() if k in ("name", "format", "trained", "steps")},
        "config": model.config.to_dict(),
        "width": str(chosen.width),
        "layer_widths": [{"heads": w.heads, "d_mlp": w.d_mlp} for w in resolve(full.config, chosen.width)],
        "flavors": flavors,
        "precision": chosen.precision,
        "quantization": options.describe(),
        "target": target.to_dict(),
        "plan": {"row": chosen.row, "reasons": chosen.reasons},
        "io": {kind: graph_io(model.config, kind).to_dict() for kind in ("step", "prefill")},
        "reference": source,
    }
    return write_bundle(req, model, graphs, manifest, progress)


def write_bundle(req: ExportRequest, model, graphs: dict, manifest: dict, progress: Progress) -> dict[str, Any]:
    """Write graphs, validate them, write README and manifest; all or nothing."""
    from edgeseq.families.native import Native
    from edgeseq.validate import plot_drift, write_report

    precision = manifest["precision"]
    with atomic_dir(req.output, overwrite=req.overwrite) as tmp:
        for flavor, kinds in graphs.items():
            for kind, proto in kinds.items():
                write_graph(tmp / flavor / f"{kind}.onnx", proto)
        if req.embed_reference:
            (tmp / "reference").mkdir()
            Native.write(model, tmp / "reference", {"source": manifest["model_name"], "width": manifest["width"]})
            manifest["reference"] = {**manifest["reference"], "embedded": "reference"}
        validation = {"ran": {}, "not_run": {}}
        if req.validate:
            device = reference_device() if req.reference_device == "auto" else req.reference_device
            for flavor in graphs:
                if not ort_runnable(flavor):
                    validation["not_run"][flavor] = NOT_RUNNABLE
                    continue
                progress("validate", f"{flavor} at {precision} against the {device} reference")
                result = validate_flavor(tmp, model, flavor, precision, req.steps, req.long_steps, req.prompts,
                                         device, req.threads, req.heldout)
                (tmp / "validation").mkdir(exist_ok=True)
                write_report(result.compare, tmp / "validation" / f"{flavor}.json")
                plot_drift(result.compare, tmp / "validation" / f"{flavor}_drift.png")
                validation["ran"][flavor] = {**result.to_dict(), "reference": device}
                if not result:
                    raise ValidationFailedError(f"{flavor} graphs fail validation: {result.summary()}; nothing was written")
        validation["summary"] = "; ".join(f"{f}: {v['summary']}" for f, v in validation["ran"].items()) or "not run"
        manifest["validation"] = validation
        manifest["graphs"] = {f: {k: f"{f}/{k}.onnx" for k in kinds} for f, kinds in graphs.items()}
        progress("bundle", str(req.output))
        (tmp / "README.md").write_text(device_readme(manifest))
        manifest = write_manifest(tmp, manifest)
    return manifest


def quantize_bundle(source: Path, precision: str, output: Path, *, overwrite: bool = False, block_size: int = 32,
                    validate: bool = True, steps: int = 256, long_steps: int = 4096, threads: int | None = None,
                    device: str = "auto", reference: str | None = None,
                    progress: Progress = lambda stage, detail: None) -> dict[str, Any]:
    """A new bundle of ``source``'s model, width and flavors at ``precision``, validated.
    The graphs are rebuilt from the reference (checked against the source's weights
    digest) without the fp32 graphs' blocked sums, then quantized."""
    from edgeseq.validation_cli import reference_model

    manifest = read_manifest(source)
    if manifest["precision"] != "fp32":
        raise EdgeseqError(f"{source} holds {manifest['precision']} graphs; quantize the fp32 bundle it came from")
    target = get_target(manifest["target"]["name"])
    _check_supported(target, precision)
    options = quant_options(target, precision, block_size)
    model, device = reference_model(source, manifest, device, reference)
    graphs = {}
    for flavor in manifest["flavors"]:  # rebuilt from the reference: the fp32 graphs' blocked sums hide the matrices
        progress("quantize", f"{flavor}: {options.describe()}")
        graphs[flavor] = {kind: quantize_graph(build_graph(model, kind, flavor), options) for kind in ("step", "prefill")}
    new = {k: v for k, v in manifest.items() if k not in ("files", "schema_version", "validation", "graphs")}
    new |= {"precision": precision, "quantization": options.describe(), "quantized_from": str(source)}
    new["reference"] = {k: v for k, v in manifest["reference"].items() if k != "embedded"}
    req = ExportRequest(None, target.name, None, output, steps=steps, long_steps=long_steps, validate=validate,
                        overwrite=overwrite, threads=threads, embed_reference="embedded" in manifest["reference"])
    return write_bundle(req, model, graphs, new, progress)
