"""scripts/soak.py on a short stream: its bounds pass on a sound bundle and can fail, and a
run stopped at its time limit and resumed from the checkpoint equals an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--steps", "3000", "--block", "1000", "--verify-steps", "150", "--context-steps", "200", "--chunk", "256"]

pytestmark = pytest.mark.slow


def soak(tmp: Path, out: str, *extra: str) -> tuple[int, str, dict]:
    cmd = [sys.executable, str(ROOT / "scripts" / "soak.py"), "mamba2-tiny", *SHORT, "--work", str(tmp / "work"),
           "--out-dir", str(tmp / out), *extra]  # fmt: skip
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    result = tmp / out / "mamba2-tiny.json"
    return done.returncode, done.stdout + done.stderr, json.loads(result.read_text()) if result.is_file() else {}


def test_soak_passes_fails_and_resumes(tmp_path):
    code, log, whole = soak(tmp_path, "whole")
    assert code == 0, log
    assert whole["complete"] and whole["summary"]["steps"] == 3000 and len(whole["blocks"]) == 3
    assert all(ok for ok, _ in whole["summary"]["verdicts"].values()), whole["summary"]["verdicts"]
    assert 0 < whole["summary"]["distance"]["overall"] < whole["summary"]["distance"]["limit"]

    # a bound tighter than the measured distance fails, with the reason and exit 1
    code, log, tight = soak(tmp_path, "tight", "--max-distance", "1e-9")
    assert code == 1 and "FAIL distance" in log, log
    assert tight["summary"]["verdicts"]["distance"][0] is False

    # stopped after its first block, then resumed in a new process: the same figures
    ckpt = str(tmp_path / "run.ckpt")
    code, log, part = soak(tmp_path, "resumed", "--time-limit", "1e-6", "--checkpoint", ckpt)
    assert code == 0 and not part["complete"] and len(part["blocks"]) == 1, log
    code, log, resumed = soak(tmp_path, "resumed", "--resume", "--checkpoint", ckpt)
    assert code == 0 and resumed["complete"] and resumed["segments"] == 2, log
    for a, b in zip(whole["blocks"], resumed["blocks"], strict=True):
        for key in ("start", "max_abs", "worst_step", "max_state", "state_vs_fp64", "nonfinite"):
            assert a[key] == b[key], (key, a, b)
