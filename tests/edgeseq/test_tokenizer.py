"""Tokenizers: bytes and a checkpoint's tokenizer.json, from encode/decode to a bundle that
streams text, and bits per byte in any vocabulary.

The HF tokenizer is a byte-level BPE trained here on a few strings, so that characters
it saw are single tokens and characters it never saw (an emoji) span several."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from edgeseq.cli import main
from edgeseq.deploy.bundle import read_manifest, sha256
from edgeseq.families import save_checkpoint
from edgeseq.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer, tokenize_sample
from tests.conftest import random_model, small_config

CORPUS = [
    "def héllo(wörld):\n    return 'naïve café' + \"—\" * 3\n",
    "日本語のテキスト ✓ ok\n",
    "class Über:\n    pass\n",
]
ALPHABET = list("abcdef ghijk\n\t(){}:'\"=+") + ["é", "ö", "ï", "—", "✓", "日", "本", "語", "🙂", "Ü", "€"]
UNSEEN = "🙂€"  # not in CORPUS: their bytes stay separate tokens


def train_tokenizer(directory, lowercase: bool = False, config: dict | None = None, bos_template: bool = False) -> None:
    """A byte-level BPE; ``bos_template``: its post-processor puts <|pad|> (id 1) first, as BOS."""
    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if lowercase:
        tk.normalizer = normalizers.Lowercase()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(CORPUS * 20, trainer)
    if bos_template:
        tk.post_processor = processors.TemplateProcessing(single="<|pad|> $A", special_tokens=[("<|pad|>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    config = config or {"eos_token": {"content": "<|endoftext|>", "__type": "AddedToken"}, "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def random_text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(ALPHABET, n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tok_dir, tmp_path_factory):
    """A small random hybrid whose vocabulary is the tokenizer's (padded to a multiple of 8)."""
    vocab = load_tokenizer(tok_dir).vocab_size
    path = tmp_path_factory.mktemp("ckpt") / "model"
    config = small_config("M S+", vocab_size=-(-vocab // 8) * 8)
    save_checkpoint(random_model(config, dtype=torch.float32), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    result = CliRunner().invoke(main, ["export", "--model", str(checkpoint), "--target", "x86", "--width", "1",
                                       "--flavor", "portable", "-o", str(out), "--steps", "16", "--long-steps", "32",
                                       "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


# ---- encode / decode -----------------------------------------------------------------------
def test_encode_decode_round_trip_on_random_text(tok_dir):
    tok, rng = load_tokenizer(tok_dir), np.random.default_rng()
    assert isinstance(tok, HFTokenizer) and tok.files == ("tokenizer.json", "tokenizer_config.json")
    for _ in range(20):
        text = random_text(rng, int(rng.integers(1, 60)))
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    assert ByteTokenizer().prompt_ids("é") == [256, 0xC3, 0xA9]


def test_special_tokens_are_read_as_transformers_reads_them(tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path / "t"
    train_tokenizer(directory, config={"bos_token": "<|pad|>", "eos_token": "<|endoftext|>"}, bos_template=True)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    ours, theirs = load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 0)
    assert ours.eos_ids == {0, 7}  # generation stops at every id generation_config names
    text = random_text(np.random.default_rng(), 40)
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.prompt_ids(text) == theirs.encode(text) == [1, *ours.encode(text)]  # the post-processor's BOS
    ids = [1, *ours.encode(text), 0]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    # an explicit add_bos_token decides, whatever the post-processor (transformers' Llama-style classes)
    for add, lead in ((True, [1]), (False, [])):
        config = {"bos_token": "<|pad|>", "eos_token": "<|endoftext|>", "add_bos_token": add}
        train_tokenizer(tmp_path / str(add), config=config, bos_template=not add)
        assert load_tokenizer(tmp_path / str(add)).prompt_ids(text) == [*lead, *ours.encode(text)]
    # without a BOS, an empty prompt starts from the document separator
    assert load_tokenizer(tok_dir).prompt_ids("") == [0]


def test_streaming_never_splits_a_character(tok_dir):
    tok, rng = load_tokenizer(tok_dir), np.random.default_rng()
    text = random_text(rng, 30) + UNSEEN + random_text(rng, 30)
    ids = tok.encode(text)
    assert len(ids) >= len(tok.encode(UNSEEN[0])) >= 4  # the emoji is one token per byte
    decoder = tok.stream_decoder()
    pieces = [decoder.step(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert "" in pieces and not any("\ufffd" in p for p in pieces)  # held back, then emitted whole
    # a stream cut inside a character flushes what it has as U+FFFD, once
    decoder = tok.stream_decoder()
    cut = tok.encode(UNSEEN[0])[:2]
    assert [decoder.step(i) for i in cut] == ["", ""] and decoder.flush() == "\ufffd" and decoder.flush() == ""
    byte_stream = ByteTokenizer().stream_decoder()
    assert [byte_stream.step(b) for b in "é✓".encode()] == ["", "é", "", "", "✓"]
    assert byte_stream.step(257) == ""  # special ids carry no text


def test_stream_after_a_prompt_decodes_in_its_context(tmp_path):
    """A word-level tokenizer puts spaces between words: text generated after a prompt starts
    with one (no "hello worldworld"), and bytes finish a character the prompt left open."""
    words = ["hello", "world", "again", "and", "more"]
    tk = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="hello"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    rng = np.random.default_rng()
    prompt = " ".join(rng.choice(words, int(rng.integers(1, 5))))
    after = [int(i) for i in rng.integers(0, len(words), 6)]
    decoder = tok.stream_decoder(after=tok.prompt_ids(prompt))
    text = "".join(decoder.step(i) for i in after) + decoder.flush()
    assert prompt + text == tok.decode(tok.prompt_ids(prompt) + after)
    assert text == " " + " ".join(words[i] for i in after)
    utf8 = "✓".encode()
    byte_stream = ByteTokenizer().stream_decoder(after=ByteTokenizer().prompt_ids("ok") + [utf8[0]])
    assert [byte_stream.step(b) for b in utf8[1:]] == ["", "✓"]


# ---- bundles -------------------------------------------------------------------------------
def test_bundle_carries_the_tokenizer_and_run_prints_its_text(bundle, checkpoint):
    from edgeseq.runtimes.session import StreamingSession

    manifest = read_manifest(bundle)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert manifest["files"][name] == sha256(checkpoint / name)
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["tokenizer"]["eos_ids"] == [0]
    heldout = manifest["validation"]["ran"]["portable"]["heldout"]
    assert heldout["passed"] and math.isfinite(heldout["reference_bpb"]) and heldout["reference_bpb"] > 0.5
    assert "tokenizer.json" in (bundle / "README.md").read_text()

    prompt = "def héllo" + UNSEEN
    result = CliRunner().invoke(main, ["run", str(bundle), "--prompt", prompt, "-n", "12", "--temperature", "0",
                                       "--threads", "1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    streamed = json.loads(result.output)
    with StreamingSession.from_bundle(bundle, threads=1) as session:
        assert session.tokenizer.kind == "hf"
        ids = list(session.generate_ids(prompt, 12, temperature=0))
        session.reset()
        text = "".join(session.generate(prompt, 12, temperature=0))
    assert streamed["tokenizer"] == "hf" and streamed["new_tokens"] == len(ids)
    assert streamed["text"] == prompt + text
    printed = CliRunner().invoke(main, ["run", str(bundle), "--prompt", prompt, "-n", "12", "--temperature", "0",
                                        "--threads", "1"])  # fmt: skip
    assert printed.exit_code == 0 and printed.stdout.startswith(prompt + text), printed.output
    assert text.encode("utf-8", "replace").decode() == text  # whole characters only

    # the reference path on the checkpoint greedily picks the same tokens
    result = CliRunner().invoke(main, ["generate", "--model", str(checkpoint), "--prompt", prompt, "-n", "12",
                                       "--temperature", "0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["text"] == text


def test_quantized_bundle_keeps_the_tokenizer(bundle, tmp_path):
    out = tmp_path / "int8"
    result = CliRunner().invoke(main, ["quantize", str(bundle), "--quant", "int8", "--no-validate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["files"]["tokenizer.json"] == read_manifest(bundle)["files"]["tokenizer.json"]
    assert manifest["tokenizer"]["kind"] == "hf"


def test_export_refuses_a_tokenizer_larger_than_the_model(tok_dir, tmp_path):
    path = tmp_path / "model"
    save_checkpoint(random_model(small_config("M", vocab_size=64), dtype=torch.float32), path)
    shutil.copyfile(tok_dir / "tokenizer.json", path / "tokenizer.json")
    result = CliRunner().invoke(main, ["export", "--model", str(path), "--target", "x86", "--width", "1",
                                       "--no-validate", "-o", str(tmp_path / "b")])  # fmt: skip
    assert result.exit_code == 2 and "has 64 token ids" in result.output, result.output
    assert not (tmp_path / "b").exists()


# ---- bits per byte -------------------------------------------------------------------------
def _bytes_of(tok: HFTokenizer, ids) -> int:
    """UTF-8 bytes of byte-level BPE tokens, read off their vocabulary strings (one
    character per byte), not through any decoder."""
    return sum(len(tok._tk.id_to_token(int(i))) for i in ids)


def test_eval_reports_total_bits_over_utf8_bytes(checkpoint):
    from edgeseq.zoo import load_model

    tokens = int(np.random.default_rng().integers(200, 400))
    result = CliRunner().invoke(main, ["eval", str(checkpoint), "--width", "1", "--tokens", str(tokens),
                                       "--segments", "2", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["tokenizer"] == "hf" and doc["tokens"] == tokens

    tok = load_tokenizer(checkpoint)
    text = tokenize_sample(tok, tokens + 1)
    model, _ = load_model(str(checkpoint))
    per = tokens // 2
    nats, counted = 0.0, []
    with torch.no_grad():
        for s in range(2):
            window = torch.from_numpy(text.ids[s * per : s * per + per + 1])
            logits, _ = model(window[None, :-1])
            loss = torch.nn.functional.cross_entropy(logits[0].double(), window[1:], reduction="none")
            scored = torch.from_numpy(text.scored[s * per + 1 : s * per + per + 1])
            nats += float(loss[scored].sum())
            counted += window[1:][scored].tolist()
    utf8 = _bytes_of(tok, counted)
    assert utf8 > len(counted)  # BPE: more bytes than tokens
    want = nats / utf8 / math.log(2)
    assert abs(doc["results"][0]["bits_per_byte"] - want) < 1e-4 * want, (doc, want)


def test_eval_refuses_a_tokenizer_that_does_not_give_the_text_back(tmp_path):
    path = tmp_path / "model"
    train_tokenizer(tmp_path / "lower", lowercase=True)
    vocab = load_tokenizer(tmp_path / "lower").vocab_size
    save_checkpoint(random_model(small_config("M", vocab_size=-(-vocab // 8) * 8), dtype=torch.float32), path)
    shutil.copyfile(tmp_path / "lower" / "tokenizer.json", path / "tokenizer.json")
    result = CliRunner().invoke(main, ["eval", str(path), "--tokens", "300", "--segments", "2"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "does not decode held-out text back to itself" in lines[0], result.output
    with pytest.raises(TokenizerError, match="cannot be put per byte"):
        tokenize_sample(load_tokenizer(path), 300)


def test_eval_refuses_a_model_that_is_not_bytes_without_a_tokenizer(tmp_path):
    path = tmp_path / "model"
    save_checkpoint(random_model(small_config("M", vocab_size=64), dtype=torch.float32), path)
    result = CliRunner().invoke(main, ["eval", str(path), "--tokens", "100", "--segments", "2"])
    assert result.exit_code == 2 and "no tokenizer.json" in result.output, result.output


def test_byte_tokenizer_json_spells_the_byte_ids(tmp_path):
    """The byte-level tokenizer.json written for onnxruntime-genai reads text exactly as
    ByteTokenizer does: the UTF-8 bytes, BOS first, specials at 256-258."""
    from edgeseq.tokenizer import ByteTokenizer, HFTokenizer

    assert ByteTokenizer().write_files(tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    hf, ours = HFTokenizer(tmp_path), ByteTokenizer()
    rng = np.random.default_rng()
    text = "".join(chr(c) for c in rng.integers(1, 0x2FFF, 200))
    assert hf.prompt_ids(text) == ours.prompt_ids(text) and hf.decode(ours.prompt_ids(text)) == text
    assert (hf.bos_id, sorted(hf.eos_ids), hf.pad_id) == (256, [257], ours.pad_id)
