"""The CLI end to end: numbers checked against real extracted modules, round trips through
saved checkpoints, and bad input answered with one error line and nothing written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from click.testing import CliRunner, Result

from edgeseq.cli import main
from edgeseq.extract import extract
from edgeseq.families import FAMILIES, load_checkpoint
from edgeseq.state import ModelState
from edgeseq.width import resolve
from edgeseq.zoo import BUILTIN, load_model

PATTERNS = {"mamba2-tiny": "M M M M M M", "hybrid-tiny": "M+ M+ M+ S+ M+ M+ M+ S+"}
ATOL = 1e-5  # fp32 logits of an extracted model vs the full model run at that width
HAS_HF = "hf" in FAMILIES and FAMILIES["hf"].writable


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "120"})


def cli_json(*args: str) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)  # exactly one document, nothing around it


def assert_user_error(result: Result, *, contains: str = "") -> str:
    """Non-zero exit, nothing on stdout, one 'error: ...' line on stderr, no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # not an unhandled bug
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert contains in lines[0]
    return lines[0]


def random_prompt(batch: int = 2, length: int = 45) -> torch.Tensor:
    return torch.randint(0, 264, (batch, length))


def logits(model, ids: torch.Tensor, width=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, width=width)[0]


def expected_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Weight bytes as one exported graph stores them (docs/quantization.md): projections and
    the head (a tied one stored again at fp32/fp16) are MatMul matrices — int8 1 B + 4 B per
    block of 128 along K (halved until it divides every K), int4 0.5 B + 4 B per 32 —, the
    embedding a Gather table (at int8/int4 the head's blocks when tied), the rest fp32."""
    named = dict(module.named_parameters())
    table = named["embedding.weight"]
    tied = "lm_head.weight" not in named
    projections = [p for n, p in named.items() if p.dim() == 2 and n not in ("embedding.weight", "lm_head.weight")]
    matrix = sum(p.numel() for p in projections) + table.numel()
    other = sum(p.numel() for n, p in named.items() if p.dim() != 2)
    block = 128
    while any(k % block for k in {p.shape[1] for p in projections} | {table.shape[1]}):
        block //= 2
    q8 = lambda n: n + 4 * math.ceil(n / block)  # noqa: E731
    q4 = lambda n: math.ceil(n / 2) + 4 * math.ceil(n / 32)  # noqa: E731
    return {"fp32": 4 * (matrix + table.numel() + other), "fp16": 2 * (matrix + table.numel()) + 4 * other,
            "int8": q8(matrix) + (0 if tied else q8(table.numel())) + 4 * other,
            "int4": q4(matrix) + (0 if tied else q4(table.numel())) + 4 * other}


# ---- inspect ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mamba2-tiny", "hybrid-tiny"])
def test_inspect_json_matches_extracted_modules(name):
    doc = cli_json("inspect", name)
    model, _ = load_model(name)
    assert doc["model"] == name and doc["format"] == "native" and doc["trained"] is True  # the shipped weights
    assert doc["layers"] == PATTERNS[name] and doc["nested_full"] is True
    assert [float(row["width"]) for row in doc["sizes"]] == list(BUILTIN[name].nested_widths)
    for row in doc["sizes"]:
        sub = extract(model, row["width"])
        assert row["params"] == sum(p.numel() for p in sub.parameters())
        assert row["weight_bytes"] == expected_bytes(sub)
        assert row["state_bytes_per_stream"] == sub.init_state(1).nbytes()
        assert row["state_bytes_per_stream"] == ModelState.zeros(model.config, 1, model.widths(row["width"])).nbytes()
        assert row["layers"] == [
            {p: sub.config.part_size(i, p) for p in spec.parts} for i, spec in enumerate(sub.config.layers)
        ]


@pytest.mark.parametrize("name", ["mamba2-tiny", "hybrid-tiny"])
def test_inspect_table(name):
    result = cli("inspect", name)
    assert result.exit_code == 0, result.output
    doc = cli_json("inspect", name)
    out = result.stdout
    assert name in out and PATTERNS[name] in out and "(native, trained," in out
    for row in doc["sizes"]:
        assert f"{row['params'] / 1e6:.2f} M" in out
    for header in ("width", "params", "fp32", "fp16", "int8", "int4", "state/stream"):
        assert header in out
    assert "as one exported graph stores them" in out  # the footnote that defines the byte columns


def test_inspect_default_model_is_mamba2_tiny():
    assert cli_json("inspect")["model"] == "mamba2-tiny"


@pytest.mark.parametrize(
    "args, contains",
    [
        (["no-such-model"], "no-such-model"),
        (["mamba2-tiny", "--format", "hf"], "mamba2-tiny"),  # forced format, no such directory
    ],
)
def test_inspect_bad_input(args, contains):
    assert_user_error(cli("inspect", *args), contains=contains)


# ---- extract ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, width", [("mamba2-tiny", "0.5"), ("hybrid-tiny", "1/4"), ("mamba2-tiny", "0.125")])
def test_extract_round_trip(tmp_path, name, width):
    out = tmp_path / "sub"
    doc = cli_json("extract", name, "--width", width, "-o", str(out))
    sub, metadata = load_checkpoint(out)
    assert metadata["format"] == "native" and metadata["source"] == name and metadata["width"] == doc["width"]
    assert metadata["trained"] is True and metadata["steps"] > 0  # provenance carries over
    assert doc["size"]["params"] == sub.num_parameters()
    assert doc["bytes_on_disk"] == sum(f.stat().st_size for f in out.iterdir())
    full, _ = load_model(name)
    assert doc["source_size"]["params"] == full.num_parameters()
    ids = random_prompt()
    torch.testing.assert_close(logits(sub, ids), logits(full, ids, width), atol=ATOL, rtol=0)
    # the submodel is nested itself: its width w is the parent's width w * width
    inner, parent = cli_json("inspect", str(out)), cli_json("inspect", name)
    parent_params = {Fraction(row["width"]): row["params"] for row in parent["sizes"]}
    assert inner["nested_full"] is False and inner["sizes"][0]["params"] == doc["size"]["params"]
    assert [Fraction(row["width"]) * Fraction(width) for row in inner["sizes"]] == [
        w for w in parent_params if w <= Fraction(width)
    ]
    for row in inner["sizes"]:
        assert row["params"] == parent_params[Fraction(row["width"]) * Fraction(width)]


@pytest.mark.parametrize(
    "name, widths",
    [("hybrid-tiny", "1,0.5,0.25,1,0.125,0.5,1,0.5"), ("mamba2-tiny", "1,0.125,0.5,0.25,1,0.5")],
)
def test_extract_per_layer_widths(tmp_path, name, widths):
    out = tmp_path / "mix"
    doc = cli_json("extract", name, "--widths", widths, "-o", str(out))
    full, _ = load_model(name)
    expected = resolve(full.config, widths)
    kept = [{kind: part[next(iter(part))] for kind, part in row["parts"].items()} for row in doc["layers"]]
    assert kept == [w.to_dict() for w in expected]
    sub, _ = load_checkpoint(out)
    assert [{p: sub.config.part_size(i, p) for p in s.parts} for i, s in enumerate(sub.config.layers)] == [
        w.to_dict() for w in expected
    ]
    assert sub.config.nested_widths == (1.0,)
    ids = random_prompt()
    torch.testing.assert_close(logits(sub, ids), logits(full, ids, widths), atol=ATOL, rtol=0)
    inner = cli_json("inspect", str(out))
    assert inner["nested_full"] is False and [row["width"] for row in inner["sizes"]] == ["1"]


def test_extract_table_names_what_was_kept(tmp_path):
    result = cli("extract", "hybrid-tiny", "--widths", "1,0.5,0.25,0.5,1,1,1,1", "-o", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "8/16" in result.stdout and "4/16" in result.stdout  # mamba2 heads
    assert "4/8 (kv 4/8)" in result.stdout  # attention heads and kv groups
    assert "256/512" in result.stdout and "128/512" in result.stdout  # MLP units


def test_extract_overwrite(tmp_path):
    out = tmp_path / "sub"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(cli("extract", "--width", "0.5", "-o", str(out)), contains="--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]  # no temporary directory left behind
    cli_json("extract", "--width", "0.5", "-o", str(out), "--overwrite")
    assert not (out / "keep.txt").exists()
    sub, _ = load_checkpoint(out)
    assert sub.config.part_size(0, "mamba2") == 12


@pytest.mark.skipif(not HAS_HF, reason="the writable 'hf' checkpoint family is not registered")
def test_extract_hf_round_trip(tmp_path):
    out = tmp_path / "hf"
    cli_json("extract", "mamba2-tiny", "--width", "0.5", "--format", "hf", "-o", str(out))
    sub, metadata = load_checkpoint(out)  # detected, not forced
    assert metadata["format"] == "hf"
    full, _ = load_model("mamba2-tiny")
    ids = random_prompt()
    torch.testing.assert_close(logits(sub, ids), logits(full, ids, "0.5"), atol=ATOL, rtol=0)


@pytest.mark.skipif(not HAS_HF, reason="the writable 'hf' checkpoint family is not registered")
@pytest.mark.parametrize("args", [["hybrid-tiny", "--width", "0.5"], ["mamba2-tiny", "--widths", "1,1,0.5,0.5,1,1"]])
def test_extract_hf_refuses_what_it_cannot_hold(tmp_path, args):
    out = tmp_path / "hf"
    assert_user_error(cli("extract", *args, "--format", "hf", "-o", str(out)), contains="native")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, contains",
    [
        (["--width", "0"], "out of range"),
        (["--width", "1.5"], "out of range"),
        (["hybrid-tiny", "--width", "0.3"], "between whole units"),  # 4.8 of 16 mamba2 heads
        (["--width", "0.1"], "between whole units"),  # 2.4 of 24 heads
        (["--width", "half"], "not a number"),
        (["--width", "0.5,0.5"], "--widths"),
        (["--widths", "1,0.5"], "6 layers"),
        (["hybrid-tiny", "--widths", "1,1,1,1,1,1,1,1,1"], "8 layers"),
        (["no-such-model", "--width", "0.5"], "no-such-model"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_extract_bad_input_writes_nothing(tmp_path, args, contains, as_json):
    out = tmp_path / "sub"
    result = cli("extract", *args, "-o", str(out), *(["--json"] if as_json else []))
    assert_user_error(result, contains=contains)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [[], ["--width", "0.5", "--widths", "1,1,1,1,1,1"]])
def test_extract_needs_exactly_one_width_option(tmp_path, args):
    result = cli("extract", *args, "-o", str(tmp_path / "sub"))
    assert result.exit_code == 2 and "Usage:" in result.stderr  # click's usage error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [[], ["inspect"], ["extract"]])
def test_help_has_an_example(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout


def test_console_script_error_is_one_line(tmp_path):
    """The real process: exit code and stderr as a user sees them."""
    out = tmp_path / "sub"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgeseq.cli", "extract", "hybrid-tiny", "--width", "0.3", "-o", str(out)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()


def test_extract_at_snapped_width_stays_inspectable(tmp_path):
    out = tmp_path / "sub"
    cli_json("extract", "--width", "0.3", "-o", str(out))  # snaps to 7 of 24 heads
    result = cli("inspect", str(out))
    assert result.exit_code == 0, result.output


def test_output_is_plain_when_not_a_terminal():
    result = cli("inspect")
    assert "\x1b[" not in result.stdout  # no colour codes in logs or pipes
