"""Atomic writes: a directory or a file appears at its path whole, or not at all, and
nothing a user owns is replaced unless the caller says it may be.

Both writers build in a temporary beside the target (same file system, so the final
``os.replace`` is a rename) and clean up on any exception, KeyboardInterrupt included:

    target exists? --no--> temp --(body ok)--> os.replace(temp, target)
          |
         yes: refused unless overwrite (and, for directories, unless ``replaceable``
              accepts what is there); on success a directory target (or any target
              under a directory temp) is first moved aside, then the temp renamed in,
              then the old one deleted; a failure puts the old one back

A file replacing a file is one rename, so a reader sees the old file or the new one,
never half of either. Missing parent directories are made, and removed again if the
write fails. Temporaries carry the writer's process id (``.NAME.<pid>.XXXX.tmp``): one
left by a killed process is removed by the next write beside it. What appears keeps the
user's umask (temporaries are made private, 0700/0600, while they are built). Every
path problem is a one-line ``OutputPathError``. Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeseq.errors import OutputExistsError, OutputPathError


def atomic_dir(target: str | Path, overwrite: bool = False,
               replaceable: Callable[[Path], str | None] | None = None) -> contextlib.AbstractContextManager[Path]:  # fmt: skip
    """Yield a new, empty directory beside ``target``; it becomes ``target`` on success.
    ``replaceable(path)`` returns why an existing target must not be replaced (None: it may)."""
    return _atomic(_resolved(target), overwrite, _temp_dir, "choose another output path or pass --overwrite",
                   replaceable)  # fmt: skip


def atomic_file(target: str | Path, overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """Yield an empty file's path beside ``target``; it becomes ``target`` on success."""
    return _atomic(_resolved(target), overwrite, _temp_file, "choose another path or pass overwrite=True", None)


def _resolved(target: str | Path) -> Path:
    """An absolute path with a real last component ('.', 'dir/' and 'a/../b' resolved)."""
    return Path(os.path.abspath(os.fspath(target)))


def _temp_dir(target: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))


def _temp_file(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


def _path_error(target: Path, error: OSError) -> OutputPathError:
    reason = error.strerror or type(error).__name__
    return OutputPathError(f"cannot write {target} ({reason}); choose another output path")


@contextlib.contextmanager
def _atomic(target: Path, overwrite: bool, make: Callable[[Path], Path], hint: str,
            replaceable: Callable[[Path], str | None] | None) -> Iterator[Path]:  # fmt: skip
    if os.path.lexists(target):
        if not overwrite:
            raise OutputExistsError(f"{target} already exists; {hint}")
        why = replaceable(target) if replaceable else None
        if why:
            raise OutputExistsError(f"{target} {why}; refusing to replace it, choose another output path")
    made = _make_parents(target)
    try:
        remove_stale(target)
        tmp = make(target)
    except OSError as e:
        _remove_made(made)
        raise _path_error(target, e) from None
    aside = None  # a private directory holding the previous target while the new one goes in
    try:
        yield tmp
        _apply_umask(tmp)
        if os.path.lexists(target) and (_is_real_dir(target) or _is_real_dir(tmp)):
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
            os.replace(target, aside / target.name)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        if aside is not None:
            if not os.path.lexists(target) and os.path.lexists(aside / target.name):
                os.replace(aside / target.name, target)
            _remove(aside)
        _remove_made(made)
        raise
    if aside is not None:
        _remove(aside)


def _make_parents(target: Path) -> list[Path]:
    """Create the target's missing parents; returns those made, innermost first."""
    missing = []
    parent = target.parent
    while not parent.exists():
        if os.path.lexists(parent):  # a dangling link
            raise OutputPathError(f"cannot write {target} ({parent} is a broken link); choose another output path")
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {target} ({parent} is not a directory); choose another output path")
    made = []
    try:
        for p in reversed(missing):
            p.mkdir()
            made.insert(0, p)
    except OSError as e:
        _remove_made(made)
        raise _path_error(target, e) from None
    return made


def _remove_made(made: list[Path]) -> None:
    for p in made:  # innermost first; only if still empty
        with contextlib.suppress(OSError):
            p.rmdir()


def remove_stale(target: Path) -> list[Path]:
    """Remove temporaries beside ``target`` left by writers that no longer run (killed
    before they could clean up); returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for p in target.parent.glob(f".{target.name}.*.*"):
            parts = p.name[len(target.name) + 2 :].split(".")
            if p.suffix not in (".tmp", ".old") or len(parts) < 3 or not parts[0].isdigit():
                continue
            if not _alive(int(parts[0])):
                _remove(p)
                removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _apply_umask(path: Path) -> None:
    """Give a finished temporary the permissions a plain mkdir/open would have."""
    mask = os.umask(0)
    os.umask(mask)
    if _is_real_dir(path):
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), 0o666 & ~mask)
    elif path.exists() and not path.is_symlink():
        os.chmod(path, 0o666 & ~mask)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
