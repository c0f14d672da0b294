"""`edgeseq eval`, `generate` and `train` on the shipped models (small slices, CPU)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeseq.cli import main
from edgeseq.data import load_sample
from edgeseq.evaluate import bits_per_byte
from edgeseq.zoo import load_model


def run(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def test_eval_json_matches_the_library():
    tokens = int(__import__("random").randint(300, 700))
    result = run("eval", "mamba2-tiny", "--width", "0.5", "--tokens", str(tokens), "--segments", "2", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    model, _ = load_model("mamba2-tiny")
    want = bits_per_byte(model, load_sample()[: tokens + 1], 0.5, segments=2)
    assert doc["tokens"] == tokens and abs(doc["results"][0]["bits_per_byte"] - want) < 1e-4


def test_generate_is_repeatable_with_a_seed_and_extract_gives_the_same_text():
    args = ("generate", "--width", "0.25", "-n", "24", "--seed", "7", "--json")
    a, b = json.loads(run(*args).output), json.loads(run(*args).output)
    assert a["text"] == b["text"] and 0 < a["new_tokens"] <= 24 and a["tokens_per_s"] > 0
    greedy = json.loads(run("generate", "--width", "1", "-n", "16", "--temperature", "0", "--json").output)
    again = json.loads(run("generate", "--width", "1", "-n", "16", "--temperature", "0", "--seed", "3", "--json").output)
    assert greedy["text"] == again["text"]  # greedy ignores the seed


@pytest.mark.parametrize(
    "args, words",
    [
        (("eval", "--width", "0.01"), "narrowest"),
        (("eval", "--segments", "0"), "segments"),
        (("generate", "-n", "0"), "-n"),
        (("generate", "--model", "no-such-model"), "built-in"),
    ],
)
def test_bad_input_is_one_line(args, words):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code != 0 and words in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
