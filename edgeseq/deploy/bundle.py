"""Bundles: what an app ships. A directory written atomically, every file at its top level:

    manifest.json            schema, model config, width, flavors, precision, I/O signature,
                             target, validation summary, sha256 of every other file
    <flavor>.step.onnx       one token for each of B streams
    <flavor>.prefill.onnx    a prompt of any length (left padding masked), chunked scan
    <flavor>.decoder.onnx    both under one If, as onnxruntime-genai runs them
                             (``edgeseq.export.genai``); portable and opset27 flavors
    weights.data             every graph's weights, each tensor stored once: the graphs
                             are ONNX files whose initializers point into it (ONNX
                             external data), so the step, prefill and decoder graphs of
                             every flavor share one copy
    genai_config.json        onnxruntime-genai's configuration: ``og.Model(<bundle>)``
                             loads the directory (absent where it cannot run the model;
                             the manifest's ``genai`` entry says why)
    tokenizer.json           the source checkpoint's (with its tokenizer_config /
                             special_tokens_map / generation_config .json); a model of
                             byte ids gets a byte-level one for onnxruntime-genai, while
                             edgeseq reads its ids as bytes (``edgeseq.tokenizer``)
    reference/               only with ``--embed-reference``: the extracted model (native,
                             fp32); otherwise the manifest names the source model and its
                             weights digest, and validation rebuilds the reference from it
    README.md                how to run it on the device

One directory level keeps the weights beside every graph: onnxruntime refuses external
data outside a model's own directory.

This module is torch-free, so that ``edgeseq run`` can read bundles without PyTorch;
it imports nothing from the rest of ``edgeseq.deploy``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeseq.errors import EdgeseqError
from edgeseq.tokenizer import Tokenizer
from edgeseq.width import find_width

SCHEMA_VERSION = 2  # 2: flat layout, weights stored once in weights.data, genai_config.json
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with a margin
WEIGHTS_FILE = "weights.data"
INLINE_BYTES = 1024  # smaller tensors stay in their graph (constants, norms of tiny models)
ALIGN, ALIGN_LARGE, LARGE = 64, 4096, 1024**2  # offsets: a tensor over LARGE bytes starts on a page (mmap)


class BundleError(EdgeseqError):
    """A bundle is missing, from another schema, or altered since it was written."""


def not_a_bundle(path: Path) -> str | None:
    """Why ``path`` is not an edgeseq bundle that ``--overwrite`` may replace (None: it is one)."""
    if not path.is_dir() or path.is_symlink():
        return "is not a directory, so not an edgeseq bundle"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "is not an edgeseq bundle (no readable manifest.json)"
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        return "is not an edgeseq bundle (its manifest.json is not one edgeseq wrote)"
    return None


def write_graph(path: Path, proto) -> None:
    """Save an ONNX model; weights go to ``<name>.data`` beside it when over 2 GB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(proto, path)


def graph_file(flavor: str, kind: str, width: str | None = None) -> str:
    """A graph's file name in a bundle; an elastic bundle's narrower widths add theirs
    (``cpu.step.w1_4.onnx``)."""
    return f"{flavor}.{kind}.onnx" if width is None else f"{flavor}.{kind}.{width_tag(width)}.onnx"


def width_tag(width: str) -> str:
    """How an elastic bundle's file names spell a narrower width: "1/2" -> "w1_2"."""
    return "w" + width.replace("/", "_")


def bundle_widths(manifest: dict[str, Any]) -> list[str]:
    """The widths a bundle streams, widest first: an elastic bundle's, else its one."""
    return list((manifest.get("elastic") or {}).get("widths") or [manifest["width"]])


def width_view(manifest: dict[str, Any], width: str) -> dict[str, Any]:
    """The manifest as it reads for one of an elastic bundle's widths: that width's
    ``width``, ``layer_widths``, ``config``, ``io`` and ``graphs`` (the widest width's
    are the manifest's own)."""
    label = find_width(bundle_widths(manifest), width)
    if label is None:
        raise BundleError(f"the bundle has no width {width!r}; it streams {', '.join(bundle_widths(manifest))}")
    if label == manifest["width"]:
        return manifest
    return {**manifest, **manifest["elastic"]["members"][label]}



def write_graphs(root: Path, graphs: dict[str, Any], blobs: Sequence[tuple[bytes, Sequence[int]]] = ()) -> int:
    """Save ONNX models (file name -> proto) into ``root`` with their weights in one
    ``weights.data``: a tensor two graphs hold (by content) is written once and both point
    at it. ``blobs`` (an elastic bundle's store, ``edgeseq.export.elastic``) are written
    first, each with the lengths of its prefixes that graphs hold: such a tensor points at
    the blob's first bytes. Returns the bytes of weights.data. The protos given are not changed."""
    import onnx
    from onnx.external_data_helper import set_external_data

    offsets: dict[bytes, tuple[int, int]] = {}
    with (root / WEIGHTS_FILE).open("wb") as data:
        for blob, lengths in blobs:
            data.write(b"\0" * (-data.tell() % (ALIGN_LARGE if len(blob) > LARGE else ALIGN)))
            start = data.tell()
            data.write(blob)
            for n in lengths:
                offsets.setdefault(hashlib.sha256(blob[:n]).digest(), (start, n))
        for name, proto in graphs.items():
            model = onnx.ModelProto()
            model.CopyFrom(proto)
            for tensor in _initializers(model.graph):
                if len(tensor.raw_data) < INLINE_BYTES:
                    continue
                key = hashlib.sha256(tensor.raw_data).digest()
                if key not in offsets:
                    align = ALIGN_LARGE if len(tensor.raw_data) > LARGE else ALIGN
                    data.write(b"\0" * (-data.tell() % align))
                    offsets[key] = (data.tell(), len(tensor.raw_data))
                    data.write(tensor.raw_data)
                offset, length = offsets[key]
                set_external_data(tensor, WEIGHTS_FILE, offset=offset, length=length)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
            onnx.save_model(model, root / name)
        size = data.tell()
    if not offsets:
        (root / WEIGHTS_FILE).unlink()
    return size


def _initializers(graph):
    """Every initializer of a graph and of the subgraphs in its nodes (If branches, loops)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _initializers(sub)


def bundle_tokenizer(root: Path, manifest: dict[str, Any]) -> Tokenizer:
    """The tokenizer edgeseq reads a bundle's ids with: its checkpoint's tokenizer.json
    where it carried one (checked against its sha256 when the manifest was read), else
    bytes (a byte-level tokenizer.json there is onnxruntime-genai's)."""
    from edgeseq.tokenizer import ByteTokenizer, load_tokenizer

    return load_tokenizer(root) if (manifest.get("tokenizer") or {}).get("files") else ByteTokenizer()


def carry_tokenizer(tokenizer: Tokenizer, root: Path, vocab_size: int) -> dict[str, Any] | None:
    """Copy a tokenizer's files into the bundle at ``root`` (they are hashed with the rest);
    -> the manifest's ``tokenizer`` entry. A tokenizer.json that does not fit the model is
    refused; bytes that do not fit (a model of other ids, no tokenizer.json) give None."""
    if tokenizer.files:
        tokenizer.check_vocab(vocab_size)
        for name in tokenizer.files:
            shutil.copyfile(tokenizer.directory / name, root / name)
    return tokenizer.describe() if tokenizer.fits(vocab_size) else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": file_hashes(root)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a bundle; with ``verify``, every file's sha256 is checked."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle (no manifest.json); create one with `edgeseq export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e.msg}); re-export the bundle") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{root} has bundle schema {manifest.get('schema_version')!r}, this edgeseq reads {SCHEMA_VERSION}; "
            "re-export it"
        )
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            f = root / rel
            if not f.is_file():
                raise BundleError(f"{f} is missing from the bundle; re-export it")
            if sha256(f) != digest:
                raise BundleError(f"{f} does not match its sha256 in manifest.json; the bundle was altered, re-export it")
    return manifest


def graph_path(root: Path, manifest: dict[str, Any], flavor: str, kind: str) -> Path:
    try:
        return root / manifest["graphs"][flavor][kind]
    except KeyError:
        have = sorted(manifest.get("graphs", {}))
        raise BundleError(f"bundle has no {flavor} {kind} graph; it carries {have}") from None


def device_readme(manifest: dict[str, Any]) -> str:
    """The short README that travels with a bundle."""
    io = manifest["io"]["step"]
    state = [t for t in io["inputs"] if t["name"] not in ("input_ids",)]
    lines = [
        f"# {manifest['model_name']} at width {manifest['width']} for {manifest['target']['name']}",
        "",
        f"Precision {manifest['precision']}; graphs: "
        + ", ".join(f"{f} ({', '.join(sorted(k))})" for f, k in manifest["graphs"].items())
        + ". Written by edgeseq; `manifest.json` lists every file with its sha256.",
        "",
        "Decode loop: feed `input_ids` [B, 1] and the state below (zeros at the start of a",
        "stream); feed every `present.*` output back into the input it pairs with",
        "(`state_pairs` in manifest.json), so memory stays constant however long the stream.",
        "",
        "| input | dtype | shape |",
        "| --- | --- | --- |",
        *(f"| `{t['name']}` | {t['dtype']} | {t['shape']} |" for t in state),
        "",
        "Prefill a prompt with `<flavor>.prefill.onnx` (`input_ids` [B, T], `attention_mask` [B, T],",
        "same state inputs), then decode with `<flavor>.step.onnx`; their weights are in `weights.data`.",
        _genai_line(manifest.get("genai")),
        "",
        "From Python, with the runtime only (`pip install edgeseq`, no PyTorch):",
        "",
        "```python",
        "from edgeseq.runtimes.session import StreamingSession",
        "",
        "with StreamingSession.from_bundle(\"path/to/this/bundle\") as session:",
        "    logits = session.prefill(prompt_ids)      # [V]",
        "    logits = session.step(int(logits.argmax()))",
        "    session.reset()",
        "    print(\"\".join(session.generate(\"def \", 100)))  # text in, text out",
        "```",
        "",
        _tokenizer_line(manifest.get("tokenizer"), bool((manifest.get("genai") or {}).get("tokenizer_files"))),
        *_elastic_lines(manifest),
        "",
        f"Validation when exported: {manifest.get('validation', {}).get('summary', 'not run')}.",
    ]
    return "\n".join(lines) + "\n"


def _elastic_lines(manifest: dict[str, Any]) -> list[str]:
    widths = bundle_widths(manifest)
    if len(widths) < 2:
        return []
    line = (f"Elastic: widths {', '.join(widths)} over one `weights.data` (the widest's graphs are the ones "
            "named above; `<flavor>.<step|prefill>.w<width>.onnx` the others'). "
            f"`session.set_width(\"{widths[-1]}\")` switches between steps; widening takes `widen=\"replay\"` "
            "(re-prefill the recent tokens) or `\"zeros\"`.")  # fmt: skip
    return ["", line]


def _genai_line(entry: dict[str, Any] | None) -> str:
    if entry is None or not entry.get("config"):
        why = (entry or {}).get("why_not", "it was written without one")
        return f"onnxruntime-genai cannot load this bundle: {why}."
    return (f"onnxruntime-genai loads this directory as it is (`og.Model(\"<bundle>\")`, or its C, C++, "
            f"C#, Java and Objective-C APIs): `{entry['config']}` names `{entry['decoder']}`.")  # fmt: skip


def _tokenizer_line(entry: dict[str, Any] | None, byte_json: bool = False) -> str:
    if entry is None:
        return "Token ids: the model's own; this bundle carries no tokenizer, so it streams ids, not text."
    if entry["files"]:
        return (f"Tokenizer: `tokenizer.json` ({entry['vocab_size']} ids, read with the `tokenizers` library; "
                f"EOS {entry['eos_ids']}); `session.tokenizer` encodes and decodes.")  # fmt: skip
    line = "Tokenizer: bytes (ids 0-255 are the UTF-8 bytes of the text, 256 BOS, 257 EOS)"
    return line + ("; `tokenizer.json` spells the same ids for onnxruntime-genai." if byte_json else ".")
