"""The JSON report round trip, the rich table and the drift PNG."""

from __future__ import annotations

import io as text_io
import json

import numpy as np
import pytest
from rich.console import Console

from edgeseq.validate.compare import compare
from edgeseq.validate.report import (
    REPORT_FORMAT,
    ReportError,
    load_report,
    plot_drift,
    print_report,
    report_dict,
    write_report,
)
from tests.edgeseq.validate.validate_toy import ToyRunner, toy_io


@pytest.fixture
def failing_result():
    seed = int(np.random.default_rng().integers(2**31))
    return compare(ToyRunner(seed, "ref"), ToyRunner(seed, "cand", a_scale=1.01, nan_from=60), toy_io(),
                   tolerance="fp32", steps=8, long_steps=80, seed=seed)  # fmt: skip


def test_json_report_round_trip(tmp_path, failing_result):
    path = write_report(failing_result, tmp_path / "parity.json", reference_device="cuda:NVIDIA H100")
    loaded = load_report(path)
    expected = report_dict(failing_result, reference_device="cuda:NVIDIA H100")
    assert {k: v for k, v in loaded.items() if k != "created"} == {k: v for k, v in expected.items() if k != "created"}
    assert loaded["format"] == REPORT_FORMAT and loaded["passed"] is False and loaded["precision"] == "fp32"
    assert loaded["runners"]["reference"] == {"name": "ref", "type": "tests.edgeseq.validate.validate_toy.ToyRunner", "device": "cuda:NVIDIA H100"}
    assert loaded["tolerance"]["drift"] == 1e-4
    assert len(loaded["phases"]["long_stream"]["series"]["logits"]) == 80
    assert loaded["phases"]["long_stream"]["outputs"]["logits"]["max_abs"] == "inf"  # strict JSON for the NaNs
    assert {f["kind"] for f in loaded["failures"]} >= {"tolerance", "nonfinite"}
    json.loads((tmp_path / "parity.json").read_text(), parse_constant=pytest.fail)  # no NaN/Infinity tokens
    assert [p.name for p in tmp_path.iterdir()] == ["parity.json"]  # no temporary left behind


def test_load_report_refuses_other_json(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ReportError, match="not an edgeseq validation report"):
        load_report(tmp_path / "x.json")


def test_drift_png(tmp_path, failing_result):
    path = plot_drift(failing_result, tmp_path / "drift.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    plot_drift(load_report(write_report(failing_result, tmp_path / "r.json")), tmp_path / "again.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "drift.png", "r.json"]
    with pytest.raises(ReportError, match="no prefill/logits series"):
        plot_drift({**report_dict(failing_result), "phases": {}}, tmp_path / "none.png", phase="prefill")


def test_table_lists_every_output_and_the_failures(failing_result):
    out = text_io.StringIO()
    print_report(failing_result, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert text.startswith("FAIL ref (cpu) vs cand (cpu), precision fp32")
    for name in ("logits", "present.0.ssm", "present.position", "long_stream"):
        assert name in text
    assert "long_stream/logits: drift" in text and "non-finite candidate values" in text
