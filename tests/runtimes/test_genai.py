"""Bundles through onnxruntime-genai: the shipped models at widths 1 and 1/2, fp32 and int8,
loaded from the bundle directory as an app loads them, decode 500 greedy tokens equal to
edgeseq's own runner (what `edgeseq run` streams with), logits within the precision's
handoff limit; the decoder graph itself; weights stored once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeseq.cli import main
from edgeseq.deploy.bundle import WEIGHTS_FILE, read_manifest
from edgeseq.deploy.genai_check import check_genai
from edgeseq.deploy.pipeline import ExportRequest, export_bundle
from edgeseq.width import WidthSpec

pytest.importorskip("onnxruntime_genai")

STEPS = 500


def _export(root, model: str, width: str, precision: str):
    out = root / f"{model}-{width.replace('/', '_')}-{precision}"
    if not out.exists():
        export_bundle(ExportRequest(model, "x86-64-cpu", WidthSpec.parse(width), out, flavor="portable",
                                    precision=precision, validate=False))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    return lambda *args: _export(root, *args)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("width", ["1", "1/2"])
@pytest.mark.parametrize("model", ["mamba2-tiny", "hybrid-tiny"])
def test_genai_greedy_500_equals_edgeseq(bundles, model, width, precision):
    from edgeseq.data import BOS, load_sample

    bundle = bundles(model, width, precision)
    manifest = read_manifest(bundle)
    assert manifest["genai"]["config"] == "genai_config.json" and (bundle / "genai_config.json").is_file()
    sample = load_sample()
    rng = np.random.default_rng()
    start, length = int(rng.integers(0, len(sample) - 300)), int(rng.integers(1, 200))
    prompt = np.concatenate([[BOS], sample[start : start + length]]).astype(np.int64)
    check = check_genai(bundle, manifest, [prompt], STEPS)
    stream = check.streams[0]
    assert stream["tokens"] == STEPS, stream  # the tiny models never pick EOS this early
    assert check, f"{model} w{width} {precision} (prompt {length} bytes at {start}): {check.summary()}"


def test_genai_text_equals_edgeseq_run(bundles):
    """Text in, text out: onnxruntime-genai's own tokenizer on the bundle's byte-level
    tokenizer.json against `edgeseq run --temperature 0`."""
    import onnxruntime_genai as og

    bundle = bundles("hybrid-tiny", "1", "fp32")
    prompt = "The state of "
    result = CliRunner().invoke(
        main, ["run", str(bundle), "--prompt", prompt, "-n", "120", "--temperature", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    ours = json.loads(result.output)["text"]
    model = og.Model(str(bundle))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    assert list(ids) == list(prompt.encode())  # bytes, as edgeseq's ByteTokenizer reads them
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=1 + len(ids) + 120)
    generator = og.Generator(model, params)
    generator.append_tokens(np.concatenate([[256], ids]).astype(np.int32))  # BOS, as edgeseq run feeds it
    while not generator.is_done():
        generator.generate_next_token()
    theirs = tokenizer.decode(generator.get_sequence(0)[1 + len(ids) :])
    assert prompt + theirs == ours  # `edgeseq run` echoes the prompt


def test_weights_are_stored_once(bundles):
    """Step, prefill and decoder graphs point into one weights.data and the tied embedding
    is the head's table: the whole bundle is within 10% of the model's weight bytes."""
    from edgeseq.extract import extract
    from edgeseq.zoo import load_model

    bundle = bundles("mamba2-tiny", "1", "fp32")
    manifest = read_manifest(bundle)
    model, _ = load_model("mamba2-tiny")
    weight_bytes = sum(t.numel() * 4 for t in extract(model, WidthSpec.parse("1")).state_dict().values())
    weights = (bundle / WEIGHTS_FILE).stat().st_size
    assert manifest["config"]["tie_embeddings"] and weights <= 1.03 * weight_bytes, (weights, weight_bytes)
    graphs = [bundle / name for name in (*manifest["graphs"]["portable"].values(), manifest["genai"]["decoder"])]
    assert all(g.stat().st_size < 0.05 * weights for g in graphs)  # graphs hold structure, not weights
    total = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
    assert total <= 1.1 * weight_bytes, (total, weight_bytes)


def test_per_layer_widths_run_in_genai_with_states_padded(bundles):
    """Mix'n'Match: layers' states differ in shape; the decoder pads them to the largest of
    their kind (onnxruntime-genai holds one shape per kind) and the tokens still agree."""
    from edgeseq.data import BOS

    rng = np.random.default_rng()
    widths = ",".join(rng.choice(["1", "0.5", "0.25"], size=8))
    bundle = bundles("hybrid-tiny", widths, "fp32")
    manifest = read_manifest(bundle)
    shapes = {tuple(t["shape"]) for t in manifest["io"]["step"]["inputs"] if t["name"].endswith(".ssm")}
    prompt = np.concatenate([[BOS], rng.integers(0, 256, int(rng.integers(1, 64)))])
    check = check_genai(bundle, manifest, [prompt], 200)
    assert check and check.streams[0]["tokens"] == 200, f"widths {widths} ({len(shapes)} ssm shapes): {check.summary()}"


@pytest.mark.parametrize("model", ["mamba2-tiny", "hybrid-tiny"])
def test_genai_snapshot_and_rewind_roll_back_like_session_restore(bundles, model):
    """onnxruntime-genai's rollback (snapshot_state after append_tokens, rewind_to, then the
    next token appended again) gives the same tokens and logits as the first time, and as
    StreamingSession.snapshot/restore. Within hybrid-tiny's 256-token window: a sliding
    window's slots written after the snapshot are not restored by onnxruntime-genai."""
    import onnxruntime_genai as og

    from edgeseq.runtimes.session import StreamingSession

    bundle = bundles(model, "1/2", "fp32")
    rng = np.random.default_rng()
    prompt = [256, *rng.integers(32, 127, int(rng.integers(4, 120))).tolist()]
    og_model = og.Model(str(bundle))
    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 64)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.asarray(prompt[:-1], dtype=np.int32))
    generator.snapshot_state()
    held = generator.token_count()

    def branch() -> tuple[list[int], np.ndarray]:
        generator.append_tokens(np.asarray(prompt[-1:], dtype=np.int32))
        tokens, logits = [], []
        for _ in range(40):
            generator.generate_next_token()
            logits.append(np.asarray(generator.get_output("logits")).reshape(-1))
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, np.stack(logits)

    first, first_logits = branch()
    generator.rewind_to(held)
    again, again_logits = branch()
    assert again == first and np.array_equal(again_logits, first_logits)
    with StreamingSession.from_bundle(bundle) as session:
        session.prefill(prompt[:-1])
        snap = session.snapshot()
        session.prefill(prompt[-1:])
        session.restore(snap)
        logits = session.prefill(prompt[-1:])
        ours = []
        for _ in range(40):
            ours.append(int(np.argmax(logits)))
            logits = session.step(ours[-1])
    assert ours == first


@pytest.mark.parametrize("model", ["mamba2-tiny", "hybrid-tiny"])
def test_genai_padded_batch_equals_each_prompt_alone(bundles, model):
    """onnxruntime-genai pads a batch on the right; the decoder moves each row's pads ahead
    of its tokens (the prefill graph's left padding), so every stream decodes as alone."""
    import onnxruntime_genai as og

    bundle = bundles(model, "1/2", "fp32")
    og_model = og.Model(str(bundle))
    tokenizer = og.Tokenizer(og_model)
    rng = np.random.default_rng()
    prompts = ["".join(map(chr, rng.integers(97, 123, int(n)))) for n in rng.integers(1, 50, 3)]

    def greedy(batch: list[str], n: int = 40) -> list[list[int]]:
        ids = tokenizer.encode_batch(batch)
        width = ids.as_numpy().shape[1]
        params = og.GeneratorParams(og_model)
        params.set_search_options(do_sample=False, max_length=width + n, batch_size=len(batch))
        generator = og.Generator(og_model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        return [list(generator.get_sequence(i)[width:]) for i in range(len(batch))]

    batched = greedy(prompts)
    for prompt, tokens in zip(prompts, batched):
        assert tokens == greedy([prompt])[0], (model, prompt)
