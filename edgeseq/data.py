"""Byte-level language-modelling data: the Python standard library's own source files.

Present on every machine, nothing to download. Each file is one document:
BOS, its bytes, EOS. Files are split into train and held-out by a stable hash of their
path relative to the stdlib root, so the split does not depend on the machine's file
order. A fixed held-out sample (<= 1 MB) ships with the package so evaluation gives the
same numbers everywhere.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseq.errors import EdgeseqError

BOS, EOS, PAD = 256, 257, 258
HELDOUT_PERCENT = 3  # files whose path hash falls below this percentile are held out
SAMPLE_DIR = Path(__file__).parent / "data"
SAMPLE_BYTES = 1_000_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


@dataclass(frozen=True)
class Document:
    relpath: str
    data: bytes


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """Every .py file under the stdlib root (site-packages excluded), sorted by path."""
    root = root or stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            docs.append(Document(rel, path.read_bytes()))
        except OSError:
            continue
    return docs


def manifest(docs: list[Document]) -> dict:
    """What a training run read: file list with hashes, and one hash over all of it."""
    files = [[d.relpath, len(d.data), hashlib.sha256(d.data).hexdigest()[:16]] for d in docs]
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {
        "python": sys.version.split()[0],
        "files": len(files),
        "bytes": sum(f[1] for f in files),
        "sha256": digest,
        "list": files,
    }


def encode(docs: list[Document]) -> np.ndarray:
    """Documents as one token stream: BOS bytes EOS BOS bytes EOS ... (uint16)."""
    parts = []
    for d in docs:
        parts += [np.array([BOS], np.uint16), np.frombuffer(d.data, np.uint8).astype(np.uint16), np.array([EOS], np.uint16)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_heldout(d.relpath)]
    heldout = [d for d in docs if is_heldout(d.relpath)]
    return train, heldout


def write_sample(heldout: list[Document], out_dir: Path, limit: int = SAMPLE_BYTES) -> dict:
    """Write the first ``limit`` bytes of whole held-out documents as sample tokens."""
    chosen, total = [], 0
    for d in heldout:
        if total + len(d.data) + 2 > limit:
            continue
        chosen.append(d)
        total += len(d.data) + 2
    tokens = encode(chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "heldout.u16").write_bytes(tokens.astype("<u2").tobytes())
    info = {k: v for k, v in manifest(chosen).items()}
    info["tokens"] = int(tokens.size)
    (out_dir / "heldout.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def load_sample(sample_dir: Path = SAMPLE_DIR) -> np.ndarray:
    """The shipped held-out sample as a token stream (int64)."""
    path = sample_dir / "heldout.u16"
    if not path.is_file():
        raise EdgeseqError(f"held-out sample {path} is missing; reinstall edgeseq from a full checkout")
    raw = path.read_bytes()
    return np.frombuffer(raw, "<u2").astype(np.int64)


def text_to_ids(text: str | bytes) -> list[int]:
    data = text.encode() if isinstance(text, str) else text
    return [BOS, *data]


def ids_to_bytes(ids) -> bytes:
    return bytes(int(i) for i in ids if int(i) < 256)
