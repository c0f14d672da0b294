"""The main job: load -> plan -> extract -> export -> quantize -> validate -> bundle.

``edgeseq.deploy`` imports one way: ``bundle`` (the format, torch-free) and ``runtimes``
(which runtime runs which flavor, torch-free) at the bottom; ``validation`` and ``run``
above them; ``bench`` and ``engine`` beside; this module on top.

``export_bundle`` writes nothing unless every stage succeeds: the bundle is assembled in
a temporary directory beside the output and renamed into place at the end. Without a
width, the sizing model (``edgeseq.targets.plan``) picks the widest configuration that
fits the target; with one, a configuration that cannot fit is refused. Validation runs
the PyTorch reference (fp32, on CUDA when there is a GPU) against every graph
onnxruntime can run here, on held-out prompts, ``steps`` decode steps with the state fed
back and one long stream, and the held-out gate (bits per byte, top-1, KL on held-out
text; what quantized bundles are judged on); graphs it cannot run here are named in the manifest.
All flavors are validated together, beside one run of the reference
(``edgeseq.deploy.validation.validate_flavors``); the stage lines go to ``progress``.

The bundle is what ships: graphs, manifest, README. The reference is rebuilt from the
source model the manifest names (its weights digest is checked), or carried in
``reference/`` with ``embed_reference``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeseq.atomic import atomic_dir
from edgeseq.deploy.bundle import (
    INLINE_BYTES,
    bundle_tokenizer,
    carry_tokenizer,
    device_readme,
    graph_file,
    not_a_bundle,
    read_manifest,
    width_tag,
    width_view,
    write_graphs,
    write_manifest,
)
from edgeseq.deploy.elastic import elastic_entry, elastic_widths, shared_options, width_label
from edgeseq.deploy.genai_check import STEPS as GENAI_STEPS
from edgeseq.deploy.genai_check import check_genai
from edgeseq.deploy.progress import Progress
from edgeseq.deploy.runtimes import runnable_here, why_not_here
from edgeseq.deploy.switching import validate_switching
from edgeseq.deploy.validation import (
    ValidationFailedError,
    handoff_limit,
    reference_models,
    resolve_device,
    validate_flavors,
    validation_prompts,
)
from edgeseq.errors import EdgeseqError
from edgeseq.export import compat
from edgeseq.export.elastic import share_prefixes
from edgeseq.export.genai import CONFIG_FILE as GENAI_CONFIG
from edgeseq.export.genai import GENAI_FLAVORS, decoder_graph, genai_config, genai_max_length, why_not_genai
from edgeseq.export.graphs import SPLIT_K, build_graph
from edgeseq.export.quantize import QuantOptions, quantize_graph
from edgeseq.export.spec import graph_io
from edgeseq.extract import extract
from edgeseq.targets import Target, get_target
from edgeseq.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_of
from edgeseq.width import WidthSpec, exact_width, resolve, untrained_warning

__all__ = ["ExportRequest", "ValidationFailedError", "export_bundle", "quantize_bundle"]


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
    threads: int | None = None  # onnxruntime's and PyTorch's threads each during validation (None: VALIDATION_THREADS)
    memory_budget: int | None = None  # bytes for the model; None: the target's
    min_tokens_per_s: float | None = None
    int4_block_size: int = 32
    embed_reference: bool = False
    heldout: tuple[int, int] = (16, 512)  # bits-per-byte gate: streams x tokens
    reference_device: str = "auto"  # where the PyTorch reference runs: auto (CUDA when there is one), cpu, cuda
    config: str | None = None  # config file of a model whose weights come apart from it (--config)
    elastic: tuple[WidthSpec, ...] | None = None  # an elastic bundle of these widths (empty: the trained ones)


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
    """The form of ``precision`` the target's runtime parses (``edgeseq.export.compat``)."""
    return compat.quant_options(target, precision, block_size)


def export_bundle(req: ExportRequest, progress: Progress | None = None) -> dict[str, Any]:
    """Run every stage; returns the manifest written to ``req.output``. The output path is
    taken before any work (a path that cannot be written, or anything but a bundle under
    ``--overwrite``, is refused at once); nothing appears there unless every stage passes."""
    progress = progress or Progress()
    if req.elastic is not None and req.width is not None:
        raise EdgeseqError("--elastic takes its widths from --widths-set (or the checkpoint's trained widths), "
                           "not --width/--widths; drop them")  # fmt: skip
    target: Target = get_target(req.target)
    compat.check_target(target, req.precision, [req.flavor] if req.flavor else list(target.flavors), req.int4_block_size)
    with bundle_dir(req.output, req.overwrite) as tmp:
        return _export(req, target, tmp, progress)


def bundle_dir(output: Path, overwrite: bool):
    """The temporary directory a bundle is built in, renamed to ``output`` on success.
    ``overwrite`` replaces an earlier edgeseq bundle only, never anything else."""
    return atomic_dir(output, overwrite=overwrite, replaceable=not_a_bundle)


def _export(req: ExportRequest, target: Target, tmp: Path, progress: Progress) -> dict[str, Any]:
    from edgeseq.zoo import load_model, weights_digest

    progress("load", f"{req.model or 'default model'}")
    full, metadata = load_model(req.model, config=req.config)
    tokenizer = tokenizer_of(req.model)
    if tokenizer.files:  # a tokenizer.json that does not fit the model fails before any work
        tokenizer.check_vocab(full.config.vocab_size)
    members = elastic_widths(full.config, req.elastic) if req.elastic is not None else []
    if members:
        req = replace(req, width=members.pop(0))  # the widest: planned, validated and described as any bundle
    if req.width is not None:
        resolve(full.config, req.width)  # a width that cannot be honoured fails here, before sizing
    chosen = plan_export(full.config, target, req)
    options = quant_options(target, chosen.precision, req.int4_block_size)  # a form the runtime parses, or refused
    for reason in chosen.reasons:
        progress("plan", reason)
    exact = exact_width(full.config, chosen.width)  # "7/24 = 0.2917" where 0.3 was asked
    label = exact.split(" = ")[0]
    if label != str(chosen.width):
        progress("width", f"{chosen.width} keeps {exact} of every layer's units")
    named = f"{req.model or 'mamba2-tiny'}" + (f" --config {req.config}" if req.config else "")
    for spec in (chosen.width, *members):
        if warning := untrained_warning(full.config, spec, named):
            progress("warning", warning)
    progress("extract", f"width {label}" + "".join(f", {width_label(full.config, w)}" for w in members))
    model = extract(full, chosen.width).float().eval()
    narrower = {width_label(full.config, w): extract(full, w).float().eval() for w in members}
    config, digest = full.config, weights_digest(full)
    del full  # the checkpoint's own copy of the weights: from here on only the extracted models are needed
    flavors = [req.flavor] if req.flavor else list(target.flavors)
    if narrower:
        options = shared_options(options, list(narrower.values())[-1], flavors[0])
    graphs = build_graphs(model, flavors, chosen.precision, options, target, progress)
    elastic = {w: (m, build_graphs(m, flavors, chosen.precision, options, target, progress, w))
               for w, m in narrower.items()}  # fmt: skip
    source = {
        "model": req.model if req.model is None or not Path(req.model).exists() else str(Path(req.model).resolve()),
        "name": metadata.get("name"), "width": label, "weights_sha256": digest,
        **({"config": metadata["config_file"]} if "config_file" in metadata else {}),
    }  # fmt: skip
    manifest = {
        "model_name": metadata.get("name"),
        "source": {k: v for k, v in metadata.items() if k in ("name", "format", "trained", "steps")},
        "config": model.config.to_dict(),
        "width": label,
        "layer_widths": [w.to_dict() for w in resolve(config, chosen.width)],
        "flavors": flavors,
        "precision": chosen.precision,
        "quantization": options.describe(),
        "target": target.to_dict(),
        "plan": {"row": chosen.row, "reasons": chosen.reasons},
        "io": {kind: graph_io(model.config, kind).to_dict() for kind in ("step", "prefill")},
        "reference": source,
        "tokenizer": carry_tokenizer(tokenizer, tmp, model.config.vocab_size),
    }
    if elastic:
        manifest["elastic"] = elastic_entry(label, {w: m for w, (m, _) in elastic.items()})
    return write_bundle(tmp, req, model, graphs, manifest, progress, elastic)


def build_graphs(model, flavors: list[str], precision: str, options: QuantOptions, target: Target, progress: Progress,
                 width: str | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each flavor's step and prefill graphs of an extracted model, quantized to ``precision``."""
    at = "" if width is None else f" at width {width}"
    graphs = {}
    for flavor in flavors:
        progress("export", flavor + at)
        # blocked sums for the fp32 step, whose rounding a stream integrates over thousands of
        # tokens (a prompt's GEMMs block K themselves); quantizers need the plain MatMuls
        split = {"step": SPLIT_K if precision == "fp32" else None, "prefill": None}
        tied_once = precision in ("fp32", "fp16")  # the int8/int4 quantizers read a [V, D] table
        graphs[flavor] = {kind: build_graph(model, kind, flavor, split_k=split[kind], tied_once=tied_once)
                          for kind in ("step", "prefill")}  # fmt: skip
        if precision != "fp32":
            progress("quantize", f"{flavor}{at}: {options.describe()}")
            tied = model.config.tie_embeddings
            graphs[flavor] = {kind: quantize_graph(g, options, tied) for kind, g in graphs[flavor].items()}
        compat.check_graphs(target, flavor, graphs[flavor])
    return graphs


def write_bundle(tmp: Path, req: ExportRequest, model, graphs: dict, manifest: dict, progress: Progress,
                 elastic: dict[str, tuple[Any, dict]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write graphs, validate them, write README and manifest into ``tmp`` (``bundle_dir``).
    ``elastic``: the narrower widths of an elastic bundle (label -> (model, graphs)), whose
    graphs read prefixes of the widest graphs' weights (``edgeseq.export.elastic``)."""
    from edgeseq.families.native import Native

    elastic = elastic or {}
    precision = manifest["precision"]
    files = {graph_file(f, kind): proto for f, kinds in graphs.items() for kind, proto in kinds.items()}
    manifest["genai"], decoder = genai_entry(model.config, manifest, graphs)
    if decoder is not None:
        files[manifest["genai"]["decoder"]] = decoder
    narrower = {graph_file(f, kind, w): proto for w, (_, g) in elastic.items() for f, kinds in g.items()
                for kind, proto in kinds.items()}  # fmt: skip
    blobs = ()
    if narrower:
        shared = share_prefixes(files, narrower, INLINE_BYTES)
        blobs = shared.blobs
        manifest["elastic"]["store"] = {"restored": shared.restored, "prefixes": shared.prefixes, "alone": shared.alone}
    manifest["weights_bytes"] = write_graphs(tmp, {**files, **narrower}, blobs)
    # the graphs are on disk now and validation loads them from there: let go of the protos,
    # which hold every weight (the caller's dict too: its keys say which graphs there are)
    files.clear()
    narrower.clear()
    decoder = decoder is not None
    graphs.update({flavor: dict.fromkeys(kinds) for flavor, kinds in graphs.items()})
    if decoder:
        write_genai_config(tmp, model.config, manifest)
    if req.embed_reference:
        (tmp / "reference").mkdir()
        Native.write(model, tmp / "reference", {"source": manifest["model_name"], "width": manifest["width"]})
        manifest["reference"] = {**manifest["reference"], "embedded": "reference"}
    manifest["graphs"] = {f: {k: graph_file(f, k) for k in kinds} for f, kinds in graphs.items()}
    for w, (_, g) in elastic.items():
        manifest["elastic"]["members"][w]["graphs"] = {f: {k: graph_file(f, k, w) for k in kinds} for f, kinds in g.items()}
    validation: dict[str, Any] = {"ran": {}, "not_run": {}}
    if req.validate:
        device = resolve_device(req.reference_device)
        validation["not_run"] = {f: why_not_here(f) for f in graphs if not runnable_here(f)}
        runnable = [f for f in graphs if runnable_here(f)]
        results = validate_width(tmp, req, manifest, model, runnable, device, progress)
        validation["ran"] = {f: {**r.to_dict(), "reference": device} for f, r in results.items()}
        for w, (m, _) in elastic.items():
            member = validate_width(tmp, req, width_view(manifest, w), m, runnable, device, progress, w)
            manifest["elastic"]["members"][w]["validation"] = {f: {**r.to_dict(), "reference": device}
                                                               for f, r in member.items()}  # fmt: skip
        if elastic:
            models = {manifest["width"]: model, **{w: m for w, (m, _) in elastic.items()}}
            for flavor in runnable:
                progress("validate", f"{flavor}: a stream that switches widths, against the reference switching alike")
                switching = validate_switching(tmp, manifest, models, flavor, device)
                validation.setdefault("switching", {})[flavor] = switching.to_dict()
                if not switching:
                    raise ValidationFailedError(f"{flavor} width switching fails validation: {switching.brief()}; "
                                                "nothing was written")  # fmt: skip
        progress("validate", "through onnxruntime-genai, greedy against the bundle's own graphs")
        genai = check_genai(tmp, manifest, validation_prompts(model.config, req.prompts), min(req.steps, GENAI_STEPS),
                            handoff_limit(precision, results))
        validation["genai"] = genai.to_dict()
        if not genai:
            raise ValidationFailedError(f"{genai.summary()}; nothing was written")
    validation["summary"] = "; ".join(f"{f}: {v['summary']}" for f, v in validation["ran"].items()) or "not run"
    if elastic and validation["ran"]:  # every check above passed, or nothing was written
        validation["summary"] += (f"; widths {', '.join(elastic)} PASS on their own; a stream switching between "
                                  "all widths PASS against the reference switching alike")  # fmt: skip
    manifest["validation"] = validation
    progress("bundle", str(req.output))
    (tmp / "README.md").write_text(device_readme(manifest))
    manifest = write_manifest(tmp, manifest)
    return manifest


def validate_width(tmp: Path, req: ExportRequest, manifest: dict, model, runnable: list[str], device: str,
                   progress: Progress, width: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Validate the runnable flavors of one width (``manifest``: its view); reports and
    plots go to validation/ (``<flavor>.w<width>.json`` for an elastic bundle's narrower
    widths). Raises ``ValidationFailedError`` on a failure."""
    from edgeseq.validate import plot_drift, write_report

    if not runnable:
        return {}
    at, tag = ("", "") if width is None else (f" at width {width}", f".{width_tag(width)}")
    progress("validate", f"{', '.join(runnable)}{at} at {manifest['precision']} against the {device} reference "
                         "(drift: fp64)")  # fmt: skip
    results = validate_flavors(tmp, manifest, model, runnable, req.steps, req.long_steps, req.prompts, device,
                               req.threads, req.heldout, progress={f: c for f in runnable if (c := progress.calls(f))})
    for flavor, result in results.items():
        (tmp / "validation").mkdir(exist_ok=True)
        write_report(result.compare, tmp / "validation" / f"{flavor}{tag}.json")
        plot_drift(result.compare, tmp / "validation" / f"{flavor}{tag}_drift.png")
        if not result:
            raise ValidationFailedError(f"{flavor} graphs{at} fail validation: {result.brief()}; nothing was written")
    return results


def genai_entry(config, manifest: dict, graphs: dict) -> tuple[dict[str, Any], Any]:
    """The manifest's ``genai`` entry and the decoder graph onnxruntime-genai runs (None,
    with the reason in the entry, where it cannot run the bundle)."""
    flavor = next((f for f in GENAI_FLAVORS if f in graphs), None)
    if flavor is None:
        return {"why_not": f"its flavors ({', '.join(graphs)}) hold ops onnxruntime does not run"}, None
    if why := why_not_genai(config, manifest["io"]["step"]):
        return {"why_not": why}, None
    decoder = decoder_graph(graphs[flavor]["step"], graphs[flavor]["prefill"])
    return {"config": GENAI_CONFIG, "decoder": graph_file(flavor, "decoder"), "flavor": flavor}, decoder


def write_genai_config(tmp: Path, config, manifest: dict) -> None:
    """genai_config.json, and a byte-level tokenizer.json where the model's ids are bytes."""
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None and not tokenizer["files"]:
        manifest["genai"]["tokenizer_files"] = ByteTokenizer().write_files(tmp)
    if tokenizer is None:  # ids that are not bytes and no tokenizer: any id may be real; og masks only batches
        pad = 0
    else:
        pad = _hf_pad(tmp, tokenizer) if tokenizer["files"] else ByteTokenizer.pad_id
    doc = genai_config(config, manifest["io"]["step"], manifest["genai"]["decoder"], tokenizer, pad,
                       genai_max_length(config))  # fmt: skip
    (tmp / GENAI_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")


def _hf_pad(tmp: Path, tokenizer: dict) -> int:
    """A checkpoint tokenizer's pad id, else its first EOS (what onnxruntime-genai's builder does)."""
    pad = load_tokenizer(tmp).pad_id
    return pad if pad is not None else (tokenizer["eos_ids"] or [0])[0]


def quantize_bundle(source: Path, precision: str, output: Path, *, overwrite: bool = False, block_size: int = 32,
                    validate: bool = True, steps: int = 256, long_steps: int = 4096, threads: int | None = None,
                    device: str = "auto", reference: str | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """A new bundle of ``source``'s model, width and flavors at ``precision``, validated.
    The graphs are rebuilt from the reference (checked against the source's weights
    digest) without the fp32 graphs' blocked sums, then quantized."""
    progress = progress or Progress()
    manifest = read_manifest(source)
    if manifest["precision"] != "fp32":
        raise EdgeseqError(f"{source} holds {manifest['precision']} graphs; quantize the fp32 bundle it came from")
    target = get_target(manifest["target"]["name"])
    _check_supported(target, precision)
    compat.check_flavors(target, manifest["flavors"])
    options = quant_options(target, precision, block_size)
    with bundle_dir(output, overwrite) as tmp:
        models, device = reference_models(source, manifest, device, reference)  # an elastic bundle's every width
        ordered = list(models.values())  # widest first
        model, narrowest = ordered[0], ordered[-1]
        if narrowest is not model:  # an elastic bundle: one int8 block for every width
            options = shared_options(options, narrowest, manifest["flavors"][0])
        graphs, elastic = {}, {}
        for w, m in models.items():  # rebuilt from the reference: the fp32 graphs' blocked sums hide the matrices
            at = "" if m is model else f" at width {w}"
            into = graphs if m is model else elastic.setdefault(w, (m, {}))[1]
            for flavor in manifest["flavors"]:
                progress("quantize", f"{flavor}{at}: {options.describe()}")
                into[flavor] = {kind: quantize_graph(build_graph(m, kind, flavor), options, m.config.tie_embeddings)
                                for kind in ("step", "prefill")}  # fmt: skip
                compat.check_graphs(target, flavor, into[flavor])
        new = {k: v for k, v in manifest.items() if k not in ("files", "schema_version", "validation", "graphs", "elastic")}
        if elastic:
            new["elastic"] = elastic_entry(manifest["width"], {w: m for w, (m, _) in elastic.items()})
        new |= {"precision": precision, "quantization": options.describe(), "quantized_from": str(source)}
        new["reference"] = {k: v for k, v in manifest["reference"].items() if k != "embedded"}
        new["tokenizer"] = carry_tokenizer(bundle_tokenizer(source, manifest), tmp, model.config.vocab_size)
        req = ExportRequest(None, target.name, None, output, steps=steps, long_steps=long_steps, validate=validate,
                            overwrite=overwrite, threads=threads, embed_reference="embedded" in manifest["reference"])
        return write_bundle(tmp, req, model, graphs, new, progress, elastic)
