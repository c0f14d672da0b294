"""A device profile: one TOML file, read strictly into a frozen ``Target``.

The file groups its keys by what they describe ([memory], [compute], [runtime],
[sizing]); ``KEYS`` maps each dotted key onto the dataclass field it fills, with the
value it expects. Every mistake a user can make in the file (bad TOML, an unknown or a
missing key, a value of the wrong type or out of range) is a one-line ``ProfileError``
that names the file, the line or key, and what to write instead.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeseq.choices import FLAVORS, INT8_PRESETS, PRECISIONS, RUNTIMES
from edgeseq.errors import EdgeseqError


class UnknownTargetError(EdgeseqError):
    """The target name matches no profile."""


class ProfileError(EdgeseqError):
    """A target profile file is missing, is not valid TOML or holds a bad value."""


class SizeError(EdgeseqError):
    """A byte size ("4 GiB", "512 MB") cannot be read."""


@dataclass(frozen=True)
class Target:
    name: str
    aliases: tuple[str, ...]  # other names ``get_target`` accepts
    description: str
    memory_bytes: int  # what the OS and the app leave the model: weights + state + working memory
    bandwidth_gbs: float  # peak DRAM bandwidth, GB/s (1e9 B/s)
    fp16_tflops: float  # dense, on the compute path the runtime uses
    int8_tops: float  # dense, same path
    runtime: str  # "onnxruntime" or "tensorrt"
    execution_providers: tuple[str, ...]  # onnxruntime EPs in preference order (TensorRT: the portable fallback)
    precisions: tuple[str, ...]  # the ones the device runs well
    default_precision: str
    int8_preset: str  # how int8 is made (choices.INT8_PRESETS): the ISA, or Q/DQ for TensorRT
    flavors: tuple[str, ...]  # graphs a bundle carries; the first is the default to run
    min_runtime_version: str
    compute_capability: str | None  # CUDA devices only
    efficiency: float  # fraction of peak bandwidth a batch-1 decode step reaches, in (0, 1]
    threads: int  # CPU threads the runtime should use
    sources: str  # where the numbers come from
    path: str  # the TOML file this was loaded from
    note: str = ""

    def to_dict(self) -> dict:
        """As the manifest records it: a shipped profile by its file name, not this machine's path."""
        d = asdict(self)
        if Path(self.path).parent == Path(__file__).parent / "profiles":
            d["path"] = f"edgeseq.targets/profiles/{Path(self.path).name}"
        return d


# ---- byte sizes ------------------------------------------------------------------------
UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """``"4GiB"``, ``"512 MB"``, ``"3.5 GB"``, ``"4096"`` or ``4096`` -> bytes (> 0)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, factor = text, 1
    else:
        match = SIZE.fullmatch(text) if isinstance(text, str) else None
        if not match or match[2].lower() not in UNITS | {"": 1}:
            raise SizeError(
                f"cannot read {text!r} as a size; write a number and a unit, e.g. '4 GiB' or '512 MB' "
                f"(units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        value, factor = float(match[1]), UNITS.get(match[2].lower(), 1)
    size = int(value * factor)
    if size <= 0:
        raise SizeError(f"size {text!r} must be at least one byte")
    return size


# ---- value checks: each returns the field value or raises ValueError/TypeError ---------
def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value.strip()


def _name(value: Any) -> str:
    name = _text(value)
    if not name:
        raise ValueError
    return name


def _number(low: float, high: float = float("inf"), *, closed_high: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        if not (low < value < high or (closed_high and value == high)):
            raise ValueError
        return float(value)

    return check


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError
    return value


def _memory(value: Any) -> int:
    try:
        return parse_bytes(value)
    except SizeError:
        raise ValueError from None


def _one_of(choices: Collection[str]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError
        return value

    return check


def _list_of(check: Callable[[Any], str], *, empty: bool = False) -> Callable[[Any], tuple[str, ...]]:
    def check_list(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not empty) or len(set(map(str, value))) != len(value):
            raise ValueError
        return tuple(check(item) for item in value)

    return check_list


def _provider(value: Any) -> str:
    if not isinstance(value, str) or not value.endswith("ExecutionProvider"):
        raise ValueError
    return value


def _version(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\d+(\.\d+)*", value):
        raise ValueError
    return value


def _capability(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\d+\.\d+", value):
        raise ValueError
    return value


@dataclass(frozen=True)
class Key:
    field: str
    expected: str  # said in the error message
    check: Callable[[Any], Any]
    default: Any = ...  # ``...``: the key is required


KEYS: dict[str, Key] = {
    "name": Key("name", "a non-empty string", _name),
    "aliases": Key("aliases", "a list of distinct strings", _list_of(_name, empty=True), ()),
    "description": Key("description", "a string", _text, ""),
    "sources": Key("sources", "a string", _text, ""),
    "note": Key("note", "a string", _text, ""),
    "memory.available": Key("memory_bytes", 'a positive size such as "4 GiB" or "512 MB"', _memory),
    "memory.bandwidth_gbs": Key("bandwidth_gbs", "a positive number of GB/s", _number(0)),
    "compute.fp16_tflops": Key("fp16_tflops", "a positive number of TFLOPS", _number(0)),
    "compute.int8_tops": Key("int8_tops", "a positive number of TOPS", _number(0)),
    "compute.capability": Key("compute_capability", 'a CUDA compute capability such as "8.7"', _capability, None),
    "compute.threads": Key("threads", "a whole number >= 1", _count),
    "runtime.name": Key("runtime", f"one of {', '.join(RUNTIMES)}", _one_of(RUNTIMES)),
    "runtime.min_version": Key("min_runtime_version", 'a version such as "1.20.0"', _version),
    "runtime.execution_providers": Key(
        "execution_providers", 'a list of onnxruntime EP names such as "CPUExecutionProvider"', _list_of(_provider)
    ),
    "runtime.precisions": Key(
        "precisions", f"a list drawn from {', '.join(PRECISIONS)}", _list_of(_one_of(PRECISIONS))
    ),
    "runtime.default_precision": Key("default_precision", "one of runtime.precisions", _one_of(PRECISIONS)),
    "runtime.int8_preset": Key("int8_preset", f"one of {', '.join(INT8_PRESETS)}", _one_of(INT8_PRESETS), None),
    "runtime.flavors": Key("flavors", f"a list drawn from {', '.join(FLAVORS)}", _list_of(_one_of(FLAVORS))),
    "sizing.efficiency": Key("efficiency", "a fraction in (0, 1]", _number(0, 1, closed_high=True)),
}
LEAVES = {dotted.rpartition(".")[2]: dotted for dotted in KEYS}


# ---- loading ---------------------------------------------------------------------------
def load_profile(path: str | Path) -> Target:
    """Read and check one profile file; every problem is a one-line ``ProfileError``."""
    doc = _read_toml(Path(path))
    flat = _flatten(doc)
    values = {"path": str(path)}
    for dotted, value in flat.items():
        if dotted not in KEYS:
            raise ProfileError(f"{path}: unknown key {dotted!r}{_nearest(dotted)} — fix the file")
        key = KEYS[dotted]
        try:
            values[key.field] = key.check(value)
        except (ValueError, TypeError):
            raise ProfileError(f"{path}: {dotted} = {value!r}: expected {key.expected} — fix the file") from None
    for dotted, key in KEYS.items():
        if key.field not in values:
            if key.default is ...:
                raise ProfileError(f"{path}: missing key {dotted!r} ({key.expected}) — add it")
            values[key.field] = key.default
    if values["int8_preset"] is None:  # Q/DQ for TensorRT's parser; AVX2 (no VNNI) is safe on any x86
        values["int8_preset"] = "qdq-weight-only" if values["runtime"] == "tensorrt" else "avx2"
    if values["default_precision"] not in values["precisions"]:
        raise ProfileError(
            f"{path}: runtime.default_precision = {values['default_precision']!r} is not in runtime.precisions "
            f"{list(values['precisions'])} — add it there or pick one of them"
        )
    return Target(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file — check the path") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read the profile ({e.strerror or e}) — check the path") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text — save the profile as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        # "Expected '=' after a key in a key/value pair (at line 7, column 5)"; ``lineno`` is 3.14+ only
        reason, _, where = str(e).rpartition(" (at ")
        line = re.match(r"line (\d+)", where)
        place = f"line {line[1]}" if line else "end of file"
        raise ProfileError(f"{path}: {place}: invalid TOML ({reason or e}) — fix the file") from None


def _flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """{"memory": {"available": x}, "name": y} -> {"memory.available": x, "name": y}."""
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _nearest(dotted: str) -> str:
    near = difflib.get_close_matches(dotted, KEYS, n=1)
    leaf = dotted.rpartition(".")[2]
    near = near or [LEAVES[m] for m in difflib.get_close_matches(leaf, LEAVES, n=1)]
    return f" (did you mean {near[0]!r}?)" if near else f"; known keys: {', '.join(KEYS)}"
