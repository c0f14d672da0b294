"""Text <-> token ids, one interface for every model edgeseq runs. Torch-free.

Two tokenizers stand behind ``Tokenizer``:

    ByteTokenizer   the built-in models' vocabulary: ids 0-255 are the UTF-8 bytes of the
                    text, 256 BOS, 257 EOS (258 PAD is never produced)
    HFTokenizer     a transformers-style tokenizer directory: ``tokenizer.json`` read with
                    the ``tokenizers`` library; special tokens from ``tokenizer_config.json``
                    / ``special_tokens_map.json`` and the ids that end generation from
                    ``generation_config.json``, where present

``load_tokenizer(dir)`` picks one for a checkpoint directory or a bundle (a bundle carries
the checkpoint's tokenizer files at its root, listed with their sha256 in manifest.json);
a directory without ``tokenizer.json`` keeps bytes.

Streaming: ``stream_decoder()`` turns ids into text as they arrive and never splits a
UTF-8 character (the HF one is ``tokenizers.decoders.DecodeStream``). ``tokenize_sample``
re-tokenizes the shipped held-out text (byte documents) and tells how many UTF-8 bytes
each token completes, so bits per byte mean the same for every vocabulary.

Departures from transformers: prompts get the tokenizer's BOS (from its post-processor or
``add_bos_token``) but never an EOS; ``decode`` always skips special tokens; a tokenizer
with no BOS starts an empty prompt from its EOS (the document separator it was trained with).
"""

from __future__ import annotations

import codecs
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.data import BOS, EOS, load_sample
from edgeseq.errors import EdgeseqError

TOKENIZER_FILE = "tokenizer.json"
# what a bundle carries beside tokenizer.json when the checkpoint has it
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class TokenizerError(EdgeseqError):
    """A tokenizer is unreadable, does not fit the model, or cannot be mapped to bytes."""


class Tokenizer:
    """What every tokenizer offers; see the module docstring."""

    kind: str  # "bytes" | "hf"
    vocab_size: int  # ids it can produce run from 0 to vocab_size - 1
    bos_id: int | None
    eos_ids: frozenset[int]  # every id that ends generation
    pad_id: int | None = None  # what a padded batch fills with, where the tokenizer names one
    files: tuple[str, ...] = ()  # files of its directory a bundle carries
    directory: Path | None = None  # where they are

    @property
    def eos_id(self) -> int | None:
        return min(self.eos_ids) if self.eos_ids else None

    def encode(self, text: str) -> list[int]:
        """The text's ids, no special tokens."""
        raise NotImplementedError

    def prompt_ids(self, text: str) -> list[int]:
        """What a model is fed for ``text``: BOS (when the tokenizer adds one) and its ids."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        raise NotImplementedError

    def stream_decoder(self, after: Sequence[int] = ()) -> StreamDecoder:
        """A decoder for the ids that follow ``after`` (a prompt already shown): their text
        is not returned, but the next ids are decoded in its context (a word-level
        tokenizer's space, a character the prompt left incomplete)."""
        raise NotImplementedError

    def fits(self, model_vocab: int | None) -> bool:
        """Whether a model of ``model_vocab`` ids (None: not fixed) takes every id this tokenizer produces."""
        return model_vocab is None or model_vocab >= self.vocab_size

    def check_vocab(self, model_vocab: int | None) -> None:
        """Refuse a model whose vocabulary cannot take every id this tokenizer produces."""
        if not self.fits(model_vocab):
            where = "its tokenizer.json" if self.kind == "hf" else "bytes (no tokenizer.json beside the weights)"
            raise TokenizerError(f"the model has {model_vocab} token ids but {where} needs {self.vocab_size}; "
                                 "put the model's own tokenizer.json in its checkpoint directory "
                                 "(and export the bundle again)")  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """For a bundle's manifest."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_ids": sorted(self.eos_ids), "files": list(self.files)}  # fmt: skip


class StreamDecoder:
    """Text as ids arrive: ``step(id)`` returns what this id completes ("" while a
    character is incomplete), ``flush()`` what is left (incomplete bytes as U+FFFD)."""

    def step(self, token: int) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        raise NotImplementedError


# ---- bytes ---------------------------------------------------------------------------------
class ByteTokenizer(Tokenizer):
    kind = "bytes"
    vocab_size = EOS + 1
    bos_id = BOS
    eos_ids = frozenset({EOS})

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def prompt_ids(self, text: str) -> list[int]:
        return [BOS, *text.encode()]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def stream_decoder(self, after: Sequence[int] = ()) -> StreamDecoder:
        stream = _ByteStream()
        for token in after:
            stream.step(token)
        return stream


    pad_id = EOS + 1  # never produced: what a padded batch may fill with

    def write_files(self, directory: Path) -> list[str]:
        """A byte-level ``tokenizer.json`` (and ``tokenizer_config.json``) of these ids for
        runtimes that read only tokenizer files (onnxruntime-genai): ids 0-255 the bytes,
        then ``<bos>``, ``<eos>``, ``<pad>``; a model's ids past those are not text (as
        ``decode`` drops them). Built with the tokenizers library; returns the file names
        written."""
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers, processors

        alphabet = _byte_alphabet()
        tk = RustTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(["<bos>", "<eos>", "<pad>"])  # ids 256, 257, 258
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
        tk.save(str(directory / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
                  "pad_token": "<pad>", "add_bos_token": True, "model_max_length": 1 << 30}  # fmt: skip
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return [TOKENIZER_FILE, "tokenizer_config.json"]


def _byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes, in order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


class _ByteStream(StreamDecoder):
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token: int) -> str:
        return self._utf8.decode(bytes([token])) if 0 <= token < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ---- transformers' tokenizer files ---------------------------------------------------------
class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.directory = directory
        path = directory / TOKENIZER_FILE
        try:
            self._tk = RustTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001  the library raises a bare Exception for every parse failure
            raise TokenizerError(f"{path} is not a tokenizer.json the tokenizers library reads ({e}); "
                                 "re-save it with transformers") from None  # fmt: skip
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        config = {name: _read_json(directory / name) for name in CONFIG_FILES}
        special = {**config["special_tokens_map.json"], **config["tokenizer_config.json"]}
        generation = config["generation_config.json"]
        self.bos_id = self._token_id(special.get("bos_token"))
        if self.bos_id is None:
            self.bos_id = _as_id(generation.get("bos_token_id"))
        self.pad_id = self._token_id(special.get("pad_token"))
        if self.pad_id is None:
            self.pad_id = _as_id(generation.get("pad_token_id"))
        eos = self._token_id(special.get("eos_token"))
        ends = set(_as_ids(generation.get("eos_token_id"))) | ({eos} if eos is not None else set())
        self.eos_ids = frozenset(ends)
        self._eos = eos if eos is not None else min(ends, default=None)  # the document separator
        self.files = (TOKENIZER_FILE, *(n for n in CONFIG_FILES if (directory / n).is_file()))
        add_bos = special.get("add_bos_token")  # when given, it overrides the post-processor, as in transformers
        self._adds_bos = self.bos_id is not None and (
            add_bos if isinstance(add_bos, bool) else self._post_processor_adds(self.bos_id)
        )

    @property
    def eos_id(self) -> int | None:
        return self._eos

    def _token_id(self, token) -> int | None:
        """transformers writes a special token as its text or as an AddedToken dict."""
        content = token.get("content") if isinstance(token, dict) else token
        return self._tk.token_to_id(content) if isinstance(content, str) else None

    def _post_processor_adds(self, bos: int) -> bool:
        with_special = self._tk.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == bos

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.encode(text)
        if self._adds_bos:
            return [self.bos_id, *ids]
        return ids or ([self.eos_id] if self.eos_id is not None else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream_decoder(self, after: Sequence[int] = ()) -> StreamDecoder:
        return _HFStream(self, after)


class _HFStream(StreamDecoder):
    def __init__(self, tokenizer: HFTokenizer, after: Sequence[int] = ()):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=[int(i) for i in after], skip_special_tokens=True)
        self._pending: list[int] = []  # ids whose text DecodeStream holds back (an incomplete character)

    def step(self, token: int) -> str:
        piece = self._stream.step(self._tokenizer._tk, int(token))
        if piece is None:
            self._pending.append(int(token))
            return ""
        self._pending.clear()
        return piece

    def flush(self) -> str:
        rest = self._tokenizer.decode(self._pending) if self._pending else ""
        self._pending.clear()
        return rest


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON ({e}); fix it or remove it") from None
    return doc if isinstance(doc, dict) else {}


def _as_id(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in map(_as_id, values) if v is not None]


def load_tokenizer(directory: str | Path | None) -> Tokenizer:
    """The tokenizer of a checkpoint directory or bundle: ``tokenizer.json`` there, else
    bytes (also for None: a built-in model)."""
    if directory is None or not (Path(directory) / TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    return HFTokenizer(Path(directory))


def tokenizer_of(model: str | None) -> Tokenizer:
    """The tokenizer of a ``--model`` argument: a checkpoint directory's, the directory of
    a weights file (a training ``.pt`` given with ``--config``), bytes for a built-in name."""
    if not model or not Path(model).exists():
        return load_tokenizer(None)
    return load_tokenizer(model if Path(model).is_dir() else Path(model).parent)


# ---- held-out text in any vocabulary -------------------------------------------------------
@dataclass(frozen=True)
class TokenizedText:
    """A token stream and, per token, the UTF-8 bytes of text it completes.

    ids (n,) int64; scored (n,) bool: the tokens that are text (not BOS/EOS), the targets
    bits per byte count; nbytes (n,) int64: bytes each token completes (0 for special
    tokens, and for a token that starts a character another token ends)."""

    ids: np.ndarray
    scored: np.ndarray
    nbytes: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> TokenizedText:
        return TokenizedText(self.ids[:n], self.scored[:n], self.nbytes[:n])


def tokenize_sample(tokenizer: Tokenizer, limit: int | None = None, sample: np.ndarray | None = None) -> TokenizedText:
    """The held-out sample (byte documents BOS ... EOS, ``edgeseq.data``) in ``tokenizer``'s
    vocabulary: each document as ``prompt_ids`` followed by EOS. Stops once ``limit``
    tokens are made. Raises TokenizerError for a tokenizer whose decoding does not give
    back the text (a normalizer, an unknown token): its bits cannot be put per byte."""
    sample = load_sample() if sample is None else sample
    if isinstance(tokenizer, ByteTokenizer):
        ids = sample if limit is None else sample[:limit]
        scored = ids < 256
        return TokenizedText(ids, scored, scored.astype(np.int64))
    ids: list[int] = []
    nbytes: list[int] = []
    scored: list[bool] = []
    for doc in _documents(sample):
        text = doc.decode("utf-8", errors="replace")
        body = tokenizer.encode(text)
        prompt = tokenizer.prompt_ids(text)
        lead = prompt[: len(prompt) - len(body)] if body else prompt
        counts = _bytes_per_token(tokenizer, body, text)
        tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        ids += [*lead, *body, *tail]
        nbytes += [0] * len(lead) + counts + [0] * len(tail)
        scored += [False] * len(lead) + [True] * len(body) + [False] * len(tail)
        if limit is not None and len(ids) >= limit:
            break
    out = TokenizedText(np.array(ids, np.int64), np.array(scored, bool), np.array(nbytes, np.int64))
    return out if limit is None else out.head(limit)


def _documents(sample: np.ndarray) -> Iterable[bytes]:
    """The byte documents of a BOS ... EOS stream (a trailing piece without EOS too)."""
    cuts = np.flatnonzero(sample >= 256)
    edges = [-1, *cuts.tolist(), len(sample)]
    for lo, hi in itertools.pairwise(edges):
        if hi - lo > 1:
            yield bytes(sample[lo + 1 : hi].astype(np.uint8))


def _bytes_per_token(tokenizer: Tokenizer, ids: list[int], text: str) -> list[int]:
    """UTF-8 bytes each id completes, streamed; refuses a tokenizer that loses text."""
    stream = tokenizer.stream_decoder()
    counts = [len(stream.step(i).encode()) for i in ids]
    rest = stream.flush()
    if rest or sum(counts) != len(text.encode()) or tokenizer.decode(ids) != text:
        got = tokenizer.decode(ids)
        at = next((k for k, (a, b) in enumerate(zip(got, text)) if a != b), min(len(got), len(text)))
        raise TokenizerError(f"this tokenizer does not decode held-out text back to itself ({text[at:at + 12]!r} "
                             f"comes back as {got[at:at + 12]!r}), so its bits cannot be put per byte; "
                             "use a tokenizer without normalizers or unknown tokens")  # fmt: skip
    return counts
