"""Atomic writes: a directory or a file appears at its path whole, or not at all.

Both writers build in a temporary beside the target (same file system, so the final
``os.replace`` is a rename) and clean up on any exception, KeyboardInterrupt included:

    target exists? --no--> temp --(body ok)--> os.replace(temp, target)
          |
         yes: refused unless overwrite; on success a directory target (or any target
              under a directory temp) is first moved aside, then the temp renamed in,
              then the old one deleted; a failure puts the old one back

A file replacing a file is one rename, so a reader sees the old file or the new one,
never half of either. Torch-free, so bundles and reports are written without PyTorch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeseq.errors import OutputExistsError


def atomic_dir(target: str | Path, overwrite: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a new, empty directory beside ``target``; it becomes ``target`` on success."""
    return _atomic(Path(target), overwrite, _temp_dir, "choose another output path or pass --overwrite")


def atomic_file(target: str | Path, overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """Yield an empty file's path beside ``target``; it becomes ``target`` on success."""
    return _atomic(Path(target), overwrite, _temp_file, "choose another path or pass overwrite=True")


def _temp_dir(target: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def _temp_file(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def _atomic(target: Path, overwrite: bool, make: Callable[[Path], Path], hint: str) -> Iterator[Path]:
    if os.path.lexists(target) and not overwrite:
        raise OutputExistsError(f"{target} already exists; {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make(target)
    aside = None  # a private directory holding the previous target while the new one goes in
    try:
        yield tmp
        if os.path.lexists(target) and (_is_real_dir(target) or _is_real_dir(tmp)):
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, aside / target.name)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        if aside is not None:
            if not os.path.lexists(target) and os.path.lexists(aside / target.name):
                os.replace(aside / target.name, target)
            _remove(aside)
        raise
    if aside is not None:
        _remove(aside)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
