"""Which runtime runs which graph flavor, and how a target's profile reaches the runner.

    flavor     runtimes that run it                       here when
    portable   onnxruntime, tensorrt (engine)             onnxruntime / tensorrt importable
    opset27    onnxruntime (>= 1.32)                      onnxruntime importable
    contrib    onnxruntime (>= 1.32, its contrib ops)     onnxruntime importable
    tensorrt   tensorrt (engine, edgeseq's AOT plugins),  tensorrt importable
               onnxruntime-plugins (plugin nodes as       onnxruntime_extensions and torch
               custom ops, the kernels' CPU twins)        importable (the ``export`` extra)

A bundle's target profile names the onnxruntime execution providers to ask for and the
CPU threads to use on the device; ``open_runner`` passes both to the runner it builds
(a provider this onnxruntime lacks is left out, so a Jetson bundle validated on an x86
CPU runs on CPUExecutionProvider here). Validation, ``StreamingSession.from_bundle`` (so
``run`` and ``bench``) get their runners from here. Torch-free.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from edgeseq.deploy.bundle import BundleError, graph_path
from edgeseq.export.spec import GraphIO


@dataclass(frozen=True)
class Runtime:
    name: str
    flavors: tuple[str, ...]  # graph flavors it runs
    modules: tuple[str, ...]  # Python modules it needs
    install: str  # what to install where it is missing
    plugins: str | None = None  # onnxruntime: how plugin nodes run (``edgeseq.runtimes.plugin_ops``)
    streams: bool = True  # runs a bundle's step/prefill graphs with the state fed back (engines need a build first)

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)


RUNTIME_TABLE = (
    Runtime("onnxruntime", ("portable", "opset27", "contrib"), ("onnxruntime",), "pip install onnxruntime"),
    Runtime("onnxruntime-plugins", ("tensorrt",), ("onnxruntime", "onnxruntime_extensions", "torch"),
            "pip install 'edgeseq[export]'", plugins="reference"),
    Runtime("tensorrt", ("tensorrt", "portable"), ("tensorrt",), "TensorRT >= 10.9 (JetPack 7 on Jetson)",
            streams=False),
)  # fmt: skip
BY_NAME = {r.name: r for r in RUNTIME_TABLE}
TENSORRT = BY_NAME["tensorrt"]  # ``build-engine``: the flavors TensorRT parses, the preferred first


def runtimes_for(flavor: str, *, streaming: bool = True) -> list[Runtime]:
    """The runtimes that run ``flavor``, in preference order (``streaming``: those that run
    the graphs as they are; a TensorRT engine is built first with ``build-engine``)."""
    return [r for r in RUNTIME_TABLE if flavor in r.flavors and (r.streams or not streaming)]


def runnable_here(flavor: str) -> Runtime | None:
    """The first runtime installed here that streams ``flavor``'s graphs, or None."""
    return next((r for r in runtimes_for(flavor) if r.available()), None)


def why_not_here(flavor: str) -> str:
    options = runtimes_for(flavor)
    if not options:
        return f"no runtime streams {flavor!r} graphs"
    return f"needs {' or '.join(r.name for r in options)}: {'; or '.join(r.install for r in options)}"


def streamed_flavor(manifest: dict, flavor: str | None = None) -> str:
    """``flavor``, or the first of a bundle's flavors that a runtime here streams; a
    BundleError that says what to install when it does not run here."""
    flavors = manifest.get("flavors") or []
    if not flavors:
        raise BundleError("the bundle's manifest lists no graph flavors; re-export it")
    if flavor is not None and flavor not in flavors:
        raise BundleError(f"the bundle has no {flavor} graphs; it carries {flavors}")
    runnable = [f for f in flavors if runnable_here(f)]
    if flavor is None and not runnable:
        why = "; ".join(f"{f} {why_not_here(f)}" for f in flavors)
        raise BundleError(f"no graph flavor of the bundle runs here: {why}")
    if flavor is not None and flavor not in runnable:
        raise BundleError(f"cannot run the {flavor} graphs here: {why_not_here(flavor)}")
    return flavor or runnable[0]


@dataclass(frozen=True)
class Placement:
    """Where a bundle's graphs run: execution providers in preference order and CPU threads."""

    providers: tuple[str, ...]
    threads: int | None  # None: onnxruntime's default (all cores)

    @classmethod
    def of_target(cls, target: dict, threads: int | None = None) -> Placement:
        """From a manifest's ``target`` (its profile as a dict): its providers, and its
        threads, at most this machine's cores; ``threads`` overrides them (0: the runtime's
        default, all cores)."""
        if threads is None and target.get("threads"):
            threads = min(target["threads"], os.cpu_count() or 1)
        return cls(tuple(target.get("execution_providers") or ("CPUExecutionProvider",)), threads or None)

    def available_providers(self) -> list[str]:
        """The profile's providers this onnxruntime has, CPU always last as the fallback."""
        import onnxruntime as ort

        have = set(ort.get_available_providers())
        chosen = [p for p in self.providers if p in have and p != "CPUExecutionProvider"]
        return [*chosen, "CPUExecutionProvider"]


def open_runner(root: Path, manifest: dict, flavor: str, kind: str, placement: Placement | None = None,
                runtime: Runtime | None = None):
    """An (inactive) runner for the bundle's ``kind`` graph of ``flavor`` on the runtime
    that streams it here (or ``runtime``), placed as the target profile says."""
    runtime = runtime or runnable_here(flavor)
    if runtime is None or flavor not in runtime.flavors:
        raise BundleError(f"cannot run the {flavor} graphs here: {why_not_here(flavor)}")
    placement = placement or Placement.of_target(manifest.get("target", {}))
    try:
        io = GraphIO.from_dict(manifest["io"][kind])
    except (KeyError, TypeError, ValueError):  # a manifest edited by hand
        raise BundleError(f"the manifest's I/O of the {kind} graph is missing or damaged; re-export") from None
    from edgeseq.runtimes.ort_runner import OnnxRuntimeRunner

    return OnnxRuntimeRunner(graph_path(root, manifest, flavor, kind), providers=placement.available_providers(),
                             intra_op_threads=placement.threads, io=io, plugins=runtime.plugins)  # fmt: skip
