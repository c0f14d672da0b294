"""Every table the CLI prints reads in an 80-column terminal: no line past 80 characters, no
column cut to an ellipsis, and every header whole on the line above its rule (rich squeezes
a table that does not fit into columns of a letter or two, words wrapped letter by letter)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from edgeseq.cli import main
from edgeseq.families import save_checkpoint
from edgeseq.validate import compare, compare_golden, print_report, record_golden
from tests.conftest import random_model, small_config
from tests.edgeseq.validate.validate_toy import ToyRunner, toy_io

WIDTH = 80
RULE = "─"
PLAN = ("width", "prec", "params", "weights", "state", "peak", "ms/tok", "tok/s", "fits")
TARGETS = (("name", "aliases", "memory", "GB/s", "TFLOPS/TOPS", "cc"), ("name", "min runtime", "precisions", "flavors"))
INSPECT = ("width", "params", "fp32", "fp16", "int8", "int4", "state/stream")
REPORT = ("output", "max abs", "rel L2", "1-cos", "top-1", "KL")


def assert_readable(text: str, *tables: tuple[str, ...]) -> None:
    """Lines within WIDTH, no ellipsis, and the header line of each table (in order) holding
    every header of that table whole."""
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert "…" not in text, text
    headers = [lines[i - 1] for i, line in enumerate(lines) if i and line.strip() and set(line.strip()) == {RULE}]
    assert len(headers) == len(tables), text
    for line, names in zip(headers, tables):
        assert all(name in line for name in names), (line, names)


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize(
    ("args", "tables"),
    [
        (("plan",), (PLAN,)),
        (("plan", "hybrid-tiny", "--target", "rpi5", "--streams", "4"), (PLAN,)),
        (("targets",), TARGETS),
        (("targets", "jetson"), TARGETS),
        (("inspect",), (INSPECT,)),
        (("inspect", "hybrid-tiny"), (INSPECT,)),
        (("eval", "hybrid-tiny", "--tokens", "200", "--segments", "2"), (("width", "bits/byte"),)),
    ],
)
def test_command_tables_read_in_80_columns(args, tables):
    assert_readable(run(*args), *tables)


def test_extract_table_reads_in_80_columns(tmp_path):
    out = run("extract", "hybrid-tiny", "--widths", "1,0.5,0.25,0.5,1,1,1,0.125", "-o", str(tmp_path / "o"))
    assert_readable(out, ("layer", "part", "kept"))


def test_bench_table_reads_in_80_columns(tmp_path):
    save_checkpoint(random_model(small_config("M M+ S+", vocab_size=264), dtype=torch.float32), tmp_path / "model")
    run("export", "--model", str(tmp_path / "model"), "--target", "x86", "--width", "0.5", "--flavor", "portable",
        "--no-validate", "-o", str(tmp_path / "deep" / "directories" / "that" / "make" / "a" / "long" / "bundle"))  # fmt: skip
    bundle = tmp_path / "deep" / "directories" / "that" / "make" / "a" / "long" / "bundle"
    out = run("bench", str(bundle), "--steps", "3", "--prompt-len", "16", "--runtime", "onnxruntime:portable")
    assert_readable(
        out.replace(str(bundle), "BUNDLE"), ("runtime", "ms/token", "tokens/s", "prefill tokens/s", "peak RSS MiB")
    )


def test_validation_report_reads_in_80_columns():
    """A live comparison and a golden replay (whose long stream kept some calls' logits)."""
    seed = int(np.random.default_rng().integers(2**31))
    oracle = ToyRunner(seed, dtype=np.float64)
    live = compare(ToyRunner(seed), ToyRunner(seed, logit_offset=3e-4), toy_io(), steps=8, long_steps=40, oracle=oracle)
    golden = record_golden(ToyRunner(seed), toy_io(), steps=8, long_steps=600, oracle=ToyRunner(seed, dtype=np.float64))
    replay = compare_golden(ToyRunner(seed), golden)
    for result in (live, replay):
        console = Console(file=io.StringIO(), width=WIDTH)
        print_report(result, console)
        text = console.file.getvalue()
        assert_readable(text, *[REPORT] * len(result.phases))
    assert "long_stream: 600 calls (200 compared)" in text
