"""``edgeseq build-engine``: a bundle's graphs built into TensorRT engines, on the device.

TensorRT engines belong to one GPU and one TensorRT version, so they are built where they
run (on the Jetson itself), from the bundle's ``tensorrt`` graphs (edgeseq's AOT plugins,
compiled for the GPU's compute capability) or its ``portable`` graphs:

    BUNDLE/engines/<name>/step.engine, prefill.engine, engine.json

Precision follows the bundle: fp16 bundles build with TensorRT's FP16 flag; int8 bundles
carry their Q/DQ nodes (explicit quantization) and also allow FP16 for the rest; fp32 and
int4 as stored. Import-guarded: without TensorRT (>= 10.9 for the plugins) it says so and
writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeseq.atomic import atomic_dir
from edgeseq.deploy.bundle import BundleError, graph_path, read_manifest
from edgeseq.deploy.runtimes import TENSORRT

ENGINE_FLAVORS = TENSORRT.flavors
from edgeseq.errors import RuntimeUnavailableError


def engine_flavor(manifest: dict, flavor: str | None) -> str:
    """The flavor to build: the one asked for, else tensorrt when the bundle has it, else portable."""
    flavors = manifest["flavors"]
    if flavor is not None:
        if flavor not in flavors or flavor not in ENGINE_FLAVORS:
            raise BundleError(f"cannot build a TensorRT engine from {flavor!r}; the bundle carries {flavors} "
                              f"(TensorRT parses {' and '.join(map(repr, ENGINE_FLAVORS))})")  # fmt: skip
        return flavor
    for choice in ENGINE_FLAVORS:
        if choice in flavors:
            return choice
    raise BundleError(f"the bundle carries {flavors}; re-export with --flavor {' or '.join(ENGINE_FLAVORS)} "
                      "to build an engine")  # fmt: skip


def build_engines(bundle: Path, target: str | None = None, flavor: str | None = None, max_batch: int = 1,
                  max_sequence: int = 2048, output: Path | None = None, progress=None) -> Path:  # fmt: skip
    """Build the step and prefill engines; returns their directory."""
    from edgeseq.export.spec import GraphIO
    from edgeseq.export.trt_plugins import compute_capability_of
    from edgeseq.runtimes.trt_runner import TensorRTRunner, import_backend
    from edgeseq.targets import get_target

    trt, torch = import_backend()  # before any work: a clear error where TensorRT or a GPU is missing
    manifest = read_manifest(bundle)
    profile = get_target(target or manifest["target"]["name"])
    flavor = engine_flavor(manifest, flavor)
    major, minor = torch.cuda.get_device_capability()
    cc = 10 * major + minor
    if profile.compute_capability and compute_capability_of(profile.compute_capability) != cc:
        raise RuntimeUnavailableError(
            f"this GPU is sm_{cc}, the target {profile.name} is sm_{profile.compute_capability.replace('.', '')}; "
            "build engines on the device they run on"
        )
    precision = manifest["precision"]
    name = output.name if output else f"{profile.name}-{flavor}-{precision}"
    final = output or bundle / "engines" / name
    if final.exists():
        raise BundleError(f"{final} exists; remove it or pass --output")
    with atomic_dir(final) as tmp:
        for kind in ("step", "prefill"):
            if progress:
                progress("build", f"{kind} from {flavor} graphs, {precision}, sm_{cc}, TensorRT {trt.__version__}")
            io = GraphIO.from_dict(manifest["io"][kind])
            runner = TensorRTRunner(
                graph_path(bundle, manifest, flavor, kind), fp16=precision in ("fp16", "int8"), max_batch=max_batch,
                max_sequence=max_sequence, edgeseq_plugins_cc=cc if flavor == "tensorrt" else None, io=io,
            )  # fmt: skip
            with runner:
                (tmp / f"{kind}.engine").write_bytes(runner.serialized_engine())
        info = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": cc,
                "flavor": flavor, "precision": precision, "max_batch": max_batch, "max_sequence": max_sequence}  # fmt: skip
        (tmp / "engine.json").write_text(json.dumps(info, indent=1) + "\n")
    return final
