"""Deployment targets. A small built-in table until the device-profile TOMLs land; each
entry names the runtime and the default export flavor, and the profile loader will take
its place behind ``get_target``."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from edgeseq.errors import EdgeseqError


class UnknownTargetError(EdgeseqError):
    """The target name matches no profile."""


@dataclass(frozen=True)
class Target:
    name: str
    aliases: tuple[str, ...]
    runtime: str  # "onnxruntime" or "tensorrt"
    flavors: tuple[str, ...]  # graphs a bundle carries; the first is the default to run
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


TENSORRT_NOTE = "TensorRT plugin graphs come with the kernels issue; the bundle carries portable graphs for TensorRT's parser"

BUILTIN = (
    Target("jetson-orin-nano-8gb", ("jetson", "orin-nano"), "tensorrt", ("portable",), TENSORRT_NOTE),
    Target("jetson-orin-nx-16gb", ("orin-nx",), "tensorrt", ("portable",), TENSORRT_NOTE),
    Target("jetson-agx-orin-64gb", ("agx-orin",), "tensorrt", ("portable",), TENSORRT_NOTE),
    Target("raspberry-pi-5", ("rpi5", "pi5"), "onnxruntime", ("portable",)),
    Target("android-arm64", ("android",), "onnxruntime", ("portable",)),
    Target("ios-arm64", ("ios",), "onnxruntime", ("portable",)),
    Target("x86-64-cpu", ("x86", "cpu"), "onnxruntime", ("portable", "opset27")),
    Target("cuda-desktop", ("cuda",), "onnxruntime", ("portable",)),
)


def known_targets() -> list[str]:
    return [t.name for t in BUILTIN]


def get_target(name: str) -> Target:
    for t in BUILTIN:
        if name == t.name or name in t.aliases:
            return t
    names = known_targets() + [a for t in BUILTIN for a in t.aliases]
    near = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise UnknownTargetError(f"unknown target {name!r}{hint}; known targets: {', '.join(known_targets())}")
