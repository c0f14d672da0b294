"""The sizing model: its byte counts against real exported graphs, and the choices it makes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from edgeseq.cli import main
from edgeseq.export import graphs
from edgeseq.export.graphs import build_graph
from edgeseq.export.quantize import QuantOptions, quantize_graph
from edgeseq.extract import extract
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.targets import get_target
from edgeseq.targets.plan import (
    PREFILL_BYTES_PER_COLUMN,
    PREFILL_TOKENS,
    SPLIT_K,
    NoFitError,
    candidate_widths,
    check_fits,
    choose,
    footprint,
    peak_memory,
    plan,
    state_bytes,
)
from edgeseq.width import WidthSpec, resolve
from edgeseq.zoo import load_model
from tests.conftest import random_model, small_config

MiB = 2**20


@pytest.fixture(scope="module")
def tiny():
    return load_model("mamba2-tiny")[0]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_match_the_exported_graph(precision, tied):
    pytest.importorskip("onnxruntime")
    config = small_config("M M+ S+ M A", d_model=64, vocab_size=264, tie_embeddings=tied)
    model = random_model(config, dtype=torch.float32)
    width = WidthSpec.parse("0.5")
    sub = extract(model, width).float()
    graph = quantize_graph(build_graph(sub, "step", "portable"), QuantOptions(precision, int8_preset="avx2"), tied)
    stored = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)  # int4 packed
    predicted = footprint(config, resolve(config, width)).weight_bytes(precision)
    # graph constants (shapes, masks, eps) come on top of the weights; a few percent at this tiny size
    assert predicted <= stored <= 1.12 * predicted, (stored, predicted)


def test_candidates_cover_every_nested_width_and_mix_n_match(tiny):
    specs = candidate_widths(tiny.config)
    nested = [w for w, kind in specs if kind == "nested"]
    assert nested == ["1", "0.5", "0.25", "0.125"]
    mixed = [w for w, kind in specs if kind == "mix'n'match"]
    assert len(mixed) == 3 and mixed[0] == "1,1,1,0.5,0.5,0.5"
    for w in mixed:
        resolve(tiny.config, WidthSpec.parse(w))  # each is a width the model can honour


def test_rows_are_ordered_and_monotone(tiny):
    target = get_target("raspberry-pi-5")
    rows = plan(tiny.config, target)
    assert {r.precision for r in rows} == set(target.precisions)
    for precision in target.precisions:
        nested = [r for r in rows if r.precision == precision and r.kind == "nested"]
        assert all(a.weight_bytes > b.weight_bytes and a.decode_ms > b.decode_ms for a, b in itertools.pairwise(nested))
    by_precision = {r.precision: r for r in rows if r.width == "1"}
    sizes = [by_precision[p].weight_bytes for p in ("fp32", "fp16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.2 * sizes[0]
    assert all(r.fits for r in rows)  # a 6 M-parameter model fits a Pi 5 at any width


def test_choice_is_the_widest_that_fits_at_the_default_precision(tiny):
    target = get_target("rpi5")
    choice = choose(plan(tiny.config, target), target)
    assert (choice.row.width, choice.row.precision) == ("1", "int8") and "widest" in choice.reasons[0]
    # a tight budget forces a narrower width; the precision falls back only where it must
    rows = plan(tiny.config, target, memory_bytes=120 * MiB)
    narrow = choose(rows, target, 120 * MiB)
    assert narrow.row.peak_bytes <= 120 * MiB and narrow.row.params < choice.row.params
    assert all(not r.fits for r in rows if r.params > narrow.row.params)


def test_speed_floor_and_budget_errors(tiny):
    target = get_target("jetson")
    with pytest.raises(NoFitError, match="narrowest configuration .* needs .* budget is 1.0 MiB"):
        choose(plan(tiny.config, target, memory_bytes=MiB), target, MiB)
    with pytest.raises(NoFitError, match="lower --min-tokens-per-s"):
        choose(plan(tiny.config, target, min_tokens_per_s=1e9), target, None, 1e9)
    rows = plan(tiny.config, target, memory_bytes=140 * MiB, widths=["1"])
    with pytest.raises(NoFitError, match="width 1 at fp32 needs .* leaves 140.0 MiB"):
        check_fits(rows, "1", "fp32", target, 140 * MiB)
    assert check_fits(rows, "1", "int4", target, 140 * MiB).fits


def test_roofline_is_traffic_over_bandwidth(tiny):
    target = get_target("x86")
    slow = dataclasses.replace(target, bandwidth_gbs=target.bandwidth_gbs / 2)
    fast_row = plan(tiny.config, target, widths=["0.5"])[0]
    slow_row = plan(tiny.config, slow, widths=["0.5"])[0]
    assert slow_row.decode_ms == pytest.approx(2 * fast_row.decode_ms)  # memory bound at batch 1
    assert fast_row.decode_ms == pytest.approx(
        1e3 * (fast_row.weight_bytes - tiny.config.vocab_size * tiny.config.d_model * 4
               + tiny.config.d_model * 4 + 2 * fast_row.state_bytes) / (target.bandwidth_gbs * 1e9 * target.efficiency),
        rel=1e-6,
    )  # fmt: skip


def test_plan_command(tmp_path):
    result = CliRunner().invoke(main, ["plan", "--target", "rpi5", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["choice"]["row"]["width"] == "1" and doc["choice"]["row"]["precision"] == "int8"
    assert len(doc["rows"]) == 7 * 4 and np.all([r["tokens_per_s"] > 0 for r in doc["rows"]])
    result = CliRunner().invoke(main, ["plan", "--target", "jetson", "--memory-budget", "1MiB"])
    assert result.exit_code == 0 and "nothing fits" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[memory\navailable = "1 GiB"\n')
    result = CliRunner().invoke(main, ["plan", "--target", str(bad)])
    assert result.exit_code == 2 and "bad.toml: line 2" in result.output and "Traceback" not in result.output


def test_peak_memory_parts(tiny):
    """fp16 weights are held at fp32 size on a CPU and at fp16 on a CUDA device; the split-K
    partial products count for fp32 graphs where they are larger than the widest layer's
    working memory; the prefill does not grow with depth; each stream adds its state twice."""
    fp = footprint(tiny.config, resolve(tiny.config, WidthSpec.parse("1")))
    state = state_bytes(tiny.config, resolve(tiny.config, WidthSpec.parse("1")))
    cpu, gpu = get_target("x86"), get_target("jetson")
    assert peak_memory(fp, "fp16", state, cpu).sessions == peak_memory(fp, "fp32", state, cpu).sessions
    assert peak_memory(fp, "fp16", state, gpu).sessions < peak_memory(fp, "fp32", state, gpu).sessions
    one, four = (peak_memory(fp, "int8", state, cpu, streams=n) for n in (1, 4))
    assert four.total - one.total == 2 * 3 * state
    wide = small_config(" ".join(["M"] * 3), d_model=768, mamba=Mamba2Params(d_state=64, headdim=32))
    deep = wide.replace(layers=wide.layers * 4, n_layer=12)
    wide_fp, deep_fp = (footprint(c, resolve(c, WidthSpec.parse("1"))) for c in (wide, deep))
    fp32, int8 = (peak_memory(wide_fp, p, 0, cpu).prefill for p in ("fp32", "int8"))
    assert SPLIT_K == graphs.SPLIT_K  # the blocks the fp32 graphs are built with
    blocks = 2 * 4 * (768 // SPLIT_K) * max(out for layer in wide_fp.layer_matrices for _, out in layer)
    assert fp32 == PREFILL_TOKENS * blocks > int8 == PREFILL_TOKENS * PREFILL_BYTES_PER_COLUMN * wide_fp.layer_columns
    assert peak_memory(deep_fp, "int8", 0, cpu).prefill == int8


def test_prediction_is_within_a_quarter_of_a_measured_process(tmp_path):
    """A shipped bundle run as `edgeseq bench` runs it, in a process that refuses torch: plan's
    peak is within 25 % of its peak RSS (scripts/plan_vs_bench.py measures every shipped one)."""
    out = tmp_path / "bundle"
    args = ["export", "--width", "0.25", "--quant", "int8", "--flavor", "portable", "--no-validate", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    child = textwrap.dedent(f"""
        import sys
        class RefuseTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch refused")
        sys.meta_path.insert(0, RefuseTorch())
        from edgeseq.deploy.bench import _bench_one
        _bench_one({str(out)!r}, "onnxruntime:portable", 5, {PREFILL_TOKENS}, 2)
        print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    measured = int(done.stdout.split()[-1])
    tiny = load_model("mamba2-tiny")[0]
    (row,) = [r for r in plan(tiny.config, get_target("x86"), widths=["0.25"]) if r.precision == "int8"]
    assert 0.75 <= row.peak_bytes / measured <= 1.25, (row.peak_bytes / MiB, measured / MiB)
