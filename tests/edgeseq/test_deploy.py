"""The main job end to end on a small random model: export -> bundle -> validate, run,
bench; bad input; and the torch-free run path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeseq.cli import main
from edgeseq.deploy.bundle import BundleError, read_manifest
from edgeseq.families import save_checkpoint
from edgeseq.testing import assert_bundle_parity
from edgeseq.validate.heldout import feeding_plan
from tests.conftest import random_model, small_config

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A hybrid model (mamba2 + windowed/global attention + MLPs) exported at width 1/2."""
    root = tmp_path_factory.mktemp("deploy")
    save_checkpoint(random_model(small_config(vocab_size=264), dtype=torch.float32), root / "model")  # bytes
    out = root / "bundle"
    result = CliRunner().invoke(main, ["export", "--model", str(root / "model"), "--target", "x86", "--width", "0.5",
                                       "-o", str(out), "--steps", "24", "--long-steps", "64", "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_bundle_layout_and_manifest(bundle):
    manifest = read_manifest(bundle)
    assert manifest["flavors"] == ["contrib", "portable"] and manifest["width"] == "0.5"
    assert set(manifest["validation"]["ran"]) == {"contrib", "portable"}
    assert all(v["passed"] for v in manifest["validation"]["ran"].values())
    genai = manifest["validation"]["genai"]  # onnxruntime-genai ran the decoder: same greedy tokens
    assert genai["passed"] and len(genai["streams"]) == 4 and all(1 <= s["tokens"] <= 24 for s in genai["streams"]), genai
    for rel in ("portable.step.onnx", "portable.prefill.onnx", "contrib.step.onnx", "contrib.decoder.onnx",
                "weights.data", "genai_config.json", "tokenizer.json", "README.md",
                "validation/portable.json", "validation/portable_drift.png"):
        assert rel in manifest["files"], rel
    assert not any(rel.startswith("reference/") for rel in manifest["files"])  # the device gets graphs only
    ref = manifest["reference"]
    assert ref["model"] == str(bundle.parent / "model") and len(ref["weights_sha256"]) == 64 and ref["width"] == "0.5"
    assert manifest["precision"] == "fp32" and manifest["quantization"] == {"precision": "fp32"}
    assert manifest["plan"]["row"]["fits"] and manifest["plan"]["row"]["width"] == "0.5"
    names = {t["name"] for t in manifest["io"]["step"]["inputs"]}
    assert {"input_ids", "past.0.conv", "past.0.ssm", "past.2.key", "past.2.value", "position"} <= names
    assert not list(bundle.parent.glob(".bundle*"))  # no temporary leftovers


def test_altered_bundle_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "portable.step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        read_manifest(copy)
    result = CliRunner().invoke(main, ["validate", str(copy)])
    assert result.exit_code == 2 and "sha256" in result.output and "Traceback" not in result.output


def test_validate_golden_round_trip_and_reports(bundle, tmp_path):
    golden, report = tmp_path / "golden.safetensors", tmp_path / "report.json"
    args = ["validate", str(bundle), "--flavor", "portable", "--steps", "16", "--long-steps", "32"]
    result = CliRunner().invoke(main, [*args, "--save-golden", str(golden), "--report", str(report), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["passed"] and doc["reference"].startswith("PyTorch fp32 on")
    assert json.loads(report.read_text())["passed"] is True
    result = CliRunner().invoke(main, ["validate", str(bundle), "--golden", str(golden), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["passed"]


def test_assert_bundle_parity_runs_what_validate_runs(bundle):
    outcome = assert_bundle_parity(bundle, steps=16, long_steps=32, heldout=(2, 32), device="cpu")
    assert outcome["passed"] and set(outcome["flavors"]) == {"contrib", "portable"}
    for entry in outcome["flavors"].values():  # both graphs of every flavor judged
        phases = entry["result"]["phases"]
        assert {"prefill", "handoff", "decode", "long_stream"} <= set(phases)
        assert phases["decode"]["calls"] == 16
        assert entry["heldout"]["tokens"] > 0


def test_validation_counts_its_calls_for_the_progress_bar(bundle):
    """The bar's total is known before the first call and every candidate call is counted:
    when everything passes, the count ends at the total."""
    from edgeseq.deploy.validation import reference_model, validate_flavor

    manifest = read_manifest(bundle)
    model, device = reference_model(bundle, manifest, "cpu")
    seen = []
    steps, long_steps = (int(x) for x in np.random.default_rng().integers(3, 12, 2))
    verdict = validate_flavor(bundle, manifest, model, "portable", steps, long_steps, 2, device, threads=1,
                              heldout=(2, 16), progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert verdict, verdict.summary()
    totals = {t for _, t in seen}
    assert len(totals) == 1 and [d for d, _ in seen] == list(range(1, len(seen) + 1))
    assert seen[-1][0] == totals.pop()


def test_run_streams_without_torch(bundle):
    """`edgeseq run` in a fresh interpreter: text comes out and torch is never imported."""
    code = (
        "import sys\n"
        "from edgeseq.cli import main\n"
        f"sys.argv = ['edgeseq', 'run', {str(bundle)!r}, '--prompt', 'ab', '-n', '12', '--seed', '1']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('TORCH-FREE')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH-FREE" in proc.stdout and "tokens/s" in proc.stderr


def test_bench_reports_every_runtime(bundle):
    result = CliRunner().invoke(main, ["bench", str(bundle), "--steps", "5", "--prompt-len", "16", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [r["runtime"] for r in rows] == ["onnxruntime:contrib", "onnxruntime:portable", "torch"]
    assert all(r["decode_ms"] > 0 and r["peak_rss_bytes"] > 0 and np.isfinite(r["prefill_tokens_per_s"]) for r in rows)


@pytest.mark.parametrize(
    "args, words",
    [
        (["export", "--width", "0.5", "--target", "jetsn"], "did you mean jetson"),
        (["export", "--width", "0.3", "--model", "hybrid-tiny"], "width 0.3"),
        (["export", "--target", "jetson", "--memory-budget", "1 MiB"], "narrowest configuration"),
        (["export", "--target", "jetson", "--width", "1", "--memory-budget", "40MiB"], "needs"),
        (["export", "--target", "rpi5", "--memory-budget", "lots"], "cannot read 'lots' as a size"),
        (["export", "--target", "x86", "--width", "1", "--min-tokens-per-s", "1", "--quant", "int8",
          "--int4-block-size", "24"], "power of two"),
        (["validate", "/no/such/bundle"], "not a bundle"),
        (["run", "/no/such/bundle"], "not a bundle"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, words):
    out = tmp_path / "out"
    if args[0] == "export":
        args = [*args, "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_validation_refuses_a_changed_source_and_takes_an_override(bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    other = tmp_path / "other"
    save_checkpoint(random_model(small_config(vocab_size=264), dtype=torch.float32, seed=99), other)
    args = ["validate", str(copy), "--flavor", "portable", "--steps", "4", "--long-steps", "8"]
    result = CliRunner().invoke(main, [*args, "--reference", str(other)])
    assert result.exit_code == 2 and "weights differ" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, [*args, "--reference", str(bundle.parent / "model")])
    assert result.exit_code == 0, result.output


def test_embedded_reference_travels_with_the_bundle(tmp_path):
    source = tmp_path / "model"
    save_checkpoint(random_model(small_config(vocab_size=264), dtype=torch.float32, seed=5), source)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", "--model", str(source), "--target", "x86", "--width", "1",
                                       "--flavor", "portable", "--embed-reference", "-o", str(out),
                                       "--steps", "8", "--long-steps", "16"])
    assert result.exit_code == 0, result.output
    import shutil

    shutil.rmtree(source)  # the bundle alone must be enough now
    assert read_manifest(out)["reference"]["embedded"] == "reference"
    result = CliRunner().invoke(main, ["validate", str(out), "--steps", "8", "--long-steps", "16", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["passed"], result.output


def _size(bundle) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def test_quantize_a_trained_bundle_passes_the_gates_and_shrinks(tmp_path):
    """The shipped model at 1/4: fp32 export, then `edgeseq quantize` to int8 and int4."""
    fp32 = tmp_path / "fp32"
    short = ["--steps", "16", "--long-steps", "32"]
    result = CliRunner().invoke(main, ["export", "--target", "x86", "--width", "0.25", "--flavor", "portable",
                                       "--quant", "fp32", "-o", str(fp32), *short])
    assert result.exit_code == 0, result.output
    sizes = {"fp32": _size(fp32)}
    for precision in ("int8", "int4"):
        out = tmp_path / precision
        result = CliRunner().invoke(main, ["quantize", str(fp32), "--quant", precision, "-o", str(out), *short, "--json"])
        assert result.exit_code == 0, result.output
        manifest = read_manifest(out)
        assert manifest["precision"] == precision and manifest["quantized_from"] == str(fp32)
        heldout = manifest["validation"]["ran"]["portable"]["heldout"]
        scored = sum(1 if kind == "prefill" else b - a for kind, a, b in feeding_plan(512, prefill=True))
        assert heldout["passed"] and heldout["tokens"] == 16 * scored  # 16 windows, prefill and decode
        assert heldout["delta"] <= manifest["validation"]["ran"]["portable"]["heldout"]["limits"]["bpb_delta"]
        sizes[precision] = _size(out)
    assert sizes["int4"] <= 0.3 * sizes["fp32"] and sizes["int8"] < sizes["fp32"], sizes
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "int8"), "--quant", "int4", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "quantize the fp32 bundle" in result.output


def test_tensorrt_flavor_bundle_validates_and_runs_through_plugin_ops(tmp_path, monkeypatch):
    """--flavor tensorrt for a Jetson: the plugin-node graphs are validated in onnxruntime
    (custom ops on the kernels' CPU twins) and stream text; build-engine without TensorRT
    says so in one line and writes nothing."""
    source = tmp_path / "model"
    save_checkpoint(random_model(small_config(vocab_size=264), dtype=torch.float32, seed=7), source)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", "--model", str(source), "--target", "jetson", "--width", "0.5",
                                       "--quant", "fp32", "--flavor", "tensorrt", "-o", str(out),
                                       "--steps", "16", "--long-steps", "32", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["flavors"] == ["tensorrt"] and manifest["validation"]["ran"]["tensorrt"]["passed"]
    result = CliRunner().invoke(main, ["run", str(out), "--prompt", "ab", "-n", "8", "--seed", "2"])
    assert result.exit_code == 0, result.output
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, installed or not
    result = CliRunner().invoke(main, ["build-engine", str(out)])
    assert result.exit_code != 0 and "TensorRT is not installed" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (out / "engines").exists()


def test_export_reports_its_stages_and_counts_every_validation_call(tmp_path):
    """A ``Progress`` subclass sees each stage in order and, per validated flavor, a call
    counter that ends at the total it announced (what the CLI's bar draws)."""
    from edgeseq.deploy.pipeline import ExportRequest, export_bundle
    from edgeseq.deploy.progress import Progress
    from edgeseq.width import WidthSpec

    class Record(Progress):
        def __init__(self):
            self.stages, self.counts = [], {}

        def __call__(self, stage, detail):
            self.stages.append(stage)

        def calls(self, flavor):
            self.counts[flavor] = []
            return lambda done, total: self.counts[flavor].append((done, total))

    record = Record()
    steps = int(np.random.randint(4, 12))
    request = ExportRequest("mamba2-tiny", "x86-64-cpu", WidthSpec.parse("1/4"), tmp_path / "b", flavor="portable",
                            steps=steps, long_steps=2 * steps, prompts=2, heldout=(2, 16))  # fmt: skip
    manifest = export_bundle(request, progress=record)
    assert record.stages[0] == "load" and record.stages.index("extract") < record.stages.index("export")
    assert record.stages[-1] == "bundle" and "validate" in record.stages
    assert set(record.counts) == set(manifest["validation"]["ran"]) == {"portable"}
    done, total = record.counts["portable"][-1]
    assert done == total > 2 * steps
