"""Safe file I/O: atomic directory writes and checked safetensors reads."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgeseq.errors import CheckpointError, OutputExistsError


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it into place on success.

    On any exception the temporary directory is removed and whatever was at ``target``
    before (with ``overwrite``) is put back.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another output path or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
