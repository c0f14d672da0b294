"""The checkpoint-family registry and what every family shares (``edgeseq.families``
registers the built-in ones).

Checkpoint families: one module per format, registered with ``@register``.

A family recognises its directories (``detect``), reads a config and tensors renamed to
the native names (``read``), and may write (``write``). ``load_model`` checks every
tensor's name, shape and values against the config before building the model.

A family with ``reads_config_file`` also reads weights kept apart from their config: a
single weights file (a training run's ``.pt``) or a directory, with ``config=FILE`` (the
CLI's ``--config``). Detection then looks at that config file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgeseq.atomic import atomic_dir
from edgeseq.choices import FORMATS, WRITABLE_FORMATS
from edgeseq.config import ModelConfig
from edgeseq.errors import CheckpointError, UnknownFormatError, UsageError
from edgeseq.model import NestedLM

FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    """Add a family. The CLI offers ``choices.FORMATS`` without importing the families (so
    ``edgeseq run`` stays torch-free); a family that list does not name is refused."""
    if cls.name not in FORMATS:
        raise UsageError(f"family {cls.name!r} is not in edgeseq.choices.FORMATS {FORMATS}; add it there")
    if cls.writable != (cls.name in WRITABLE_FORMATS):
        raise UsageError(
            f"family {cls.name!r} has writable={cls.writable} but edgeseq.choices.WRITABLE_FORMATS is "
            f"{WRITABLE_FORMATS}; make them agree"
        )
    FAMILIES[cls.name] = cls
    return cls


class Family:
    name: ClassVar[str]
    description: ClassVar[str]
    writable: ClassVar[bool] = False
    reads_config_file: ClassVar[bool] = False  # read() takes config=FILE (weights apart from config.json)
    # Families are asked in this order, lower first: one that knows its configs by their structure
    # goes before those matching a model_type tag that another format's config may also carry.
    detect_order: ClassVar[int] = 0

    @classmethod
    def detect(cls, path: Path) -> bool:
        raise NotImplementedError

    @classmethod
    def read(cls, path: Path) -> tuple[ModelConfig, Iterable[tuple[str, torch.Tensor]], dict[str, Any]]:
        """-> config, (native name, tensor) pairs, metadata. Families with ``reads_config_file``
        also take ``config=FILE``, and then ``path`` may be a weights file."""
        raise NotImplementedError

    @classmethod
    def write(cls, model: NestedLM, path: Path, metadata: dict[str, Any] | None = None) -> None:
        """Write into the (new, empty) directory ``path``."""
        raise CheckpointError(f"format {cls.name!r} is read-only; write with --format native")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a checkpoint directory needs its config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or regenerate it") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with one-line errors for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the checkpoint directory is incomplete, re-download or re-export it")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}); re-download or re-export it") from None


def peek_json(path: Path) -> dict[str, Any] | None:
    """config.json of a directory (or a .json config file itself) as a dict, or None where
    there is none that parses (detection must not fail: the chosen family's read reports a
    damaged file)."""
    cfg = path if path.suffix == ".json" and path.is_file() else path / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def lookup(d: dict[str, Any], *aliases: str, default: Any = KeyError) -> Any:
    """The first of ``aliases`` present in ``d`` (hyperparameter names differ by family)."""
    for a in aliases:
        if a in d:
            return d[a]
    if default is KeyError:
        raise CheckpointError(f"config.json lacks {aliases[0]!r}; add it or re-export the checkpoint")
    return default


def known_formats() -> str:
    return ", ".join(f"{n} ({c.description})" for n, c in sorted(FAMILIES.items()))


def get_family(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise UnknownFormatError(f"unknown format {name!r}; known formats: {known_formats()}")
    return FAMILIES[name]


def detect_family(path: Path) -> type[Family]:
    """The family of a checkpoint directory, or of a config file given apart from its weights."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a model directory or a built-in model name")
    if path.is_file() and path.suffix != ".json":
        raise CheckpointError(f"{path} is a weights file; give its directory, or its config with --config FILE")
    for family in sorted(FAMILIES.values(), key=lambda f: f.detect_order):
        if family.detect(path):
            return family
    config = path if path.is_file() else path / "config.json"
    if config.is_file():
        read_json(config)  # a damaged config.json gets its own error, not "unknown format"
    raise UnknownFormatError(f"{path} is in no known checkpoint format; known formats: {known_formats()}")


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], dtype=torch.float32) -> NestedLM:
    """A model from renamed tensors, after checking names, shapes and finiteness."""
    with torch.device("meta"):
        model = NestedLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = dict(tensors)
    if config.tie_embeddings:
        given.pop("lm_head.weight", None)  # some writers store the tied copy too
    missing = sorted(set(expected) - set(given))
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; "
            "it does not match its config, re-export it or fix config.json"
        )
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}; check its config")
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(given[name].shape)} but the config implies {shape}; "
                "the checkpoint and its config disagree, re-export it or fix config.json"
            )
        t = given[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"tensor {name} holds {bad} NaN/Inf values; the checkpoint is damaged, re-export it")
        given[name] = t.to(dtype)
    model.load_state_dict(given, strict=True, assign=True)
    return model


def load_checkpoint(
    path: str | Path, format: str | None = None, dtype=torch.float32, config: str | Path | None = None
) -> tuple[NestedLM, dict[str, Any]]:
    """(model, metadata) from a checkpoint directory in any registered format; with ``config``
    (a config file), from a weights file or directory that a ``reads_config_file`` family reads."""
    path = Path(path)
    if config is None:
        family = get_family(format) if format else detect_family(path)
        model_config, tensors, metadata = family.read(path)
    else:
        family = get_family(format) if format else detect_family(Path(config))
        if not family.reads_config_file:
            takers = ", ".join(n for n, f in sorted(FAMILIES.items()) if f.reads_config_file)
            raise UsageError(f"--config works for format {takers} only; a {family.name} checkpoint keeps "
                             "config.json beside its weights, so give its directory without --config")  # fmt: skip
        if not path.exists():
            raise CheckpointError(f"{path} does not exist; give the weights file or its directory")
        model_config, tensors, metadata = family.read(path, config=Path(config))
    metadata = {"format": family.name, **metadata}
    return build_model(model_config, tensors, dtype), metadata


def save_checkpoint(model: NestedLM, path: str | Path, format: str = "native", metadata=None, overwrite=False) -> Path:
    """Write atomically: nothing appears at ``path`` unless the whole write succeeds."""
    family = get_family(format)
    if not family.writable:
        family.write(model, Path(path))  # raises the read-only error
    try:
        with atomic_dir(path, overwrite=overwrite) as tmp:
            family.write(model, tmp, metadata)
    except (OSError, SafetensorError) as e:  # disk full, no permission: a user-fixable error, not a crash
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        msg = f"could not write {path} ({reason}); nothing was written, free space or pick another path"
        raise CheckpointError(msg) from None
    return Path(path)
