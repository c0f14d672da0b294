"""Nothing a user owns is lost: --overwrite replaces only a bundle, output paths are checked
before any work, interrupts clean up and exit 130, stale temporaries go, files keep the
user's umask."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeseq.atomic import atomic_dir, remove_stale
from edgeseq.cli import main
from edgeseq.errors import OutputExistsError, OutputPathError

QUICK = ["--no-validate", "--target", "x86", "--width", "0.25", "--quant", "fp32", "--flavor", "portable"]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the pipeline gets as far as loading a model."""
    import edgeseq.zoo

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(edgeseq.zoo, "load_model", refuse)


def test_overwrite_refuses_a_folder_that_is_not_a_bundle(tmp_path, no_work):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "mywork.py").write_text("print('mine')\n")
    line = one_line_error(cli("export", *QUICK, "-o", str(proj), "--overwrite"))
    assert "not an edgeseq bundle" in line
    assert [p.name for p in proj.iterdir()] == ["mywork.py"] and sorted(p.name for p in tmp_path.iterdir()) == ["proj"]
    (tmp_path / "file.txt").write_text("mine")
    assert "not a directory" in one_line_error(cli("export", *QUICK, "-o", str(tmp_path / "file.txt"), "--overwrite"))
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_overwrite_replaces_an_earlier_bundle(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    (out / "stale.onnx").write_text("old")
    result = cli("export", *QUICK, "-o", str(out), "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    assert (out / "portable.step.onnx").is_file() and not (out / "stale.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("where", ["/proc/edgeseq-test/out", "file-parent", "."])
def test_unwritable_outputs_fail_first_in_one_line(tmp_path, monkeypatch, no_work, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("mine")
    target = {"file-parent": "notes.md/sub"}.get(where, where)
    line = one_line_error(cli("export", *QUICK, "-o", target, *(["--overwrite"] if where == "." else [])))
    assert ("cannot write" in line) or ("not an edgeseq bundle" in line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"] and (tmp_path / "notes.md").read_text() == "mine"


def test_missing_parents_are_made_and_removed_again_on_failure(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        assert tmp.parent == target.parent
        raise RuntimeError("a stage failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="not a directory"), atomic_dir(tmp_path / "f" / "x"):
        pass


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".out.{pid}.abcd.tmp"
    stale.mkdir()
    (stale / "step.onnx").write_text("half")
    mine = tmp_path / f".out.{os.getpid()}.efgh.tmp"  # a live writer's: kept
    mine.mkdir()
    other = tmp_path / ".out.notes.tmp"  # not a temporary of ours: kept
    other.write_text("x")
    assert remove_stale(tmp_path / "out") == [stale]
    assert mine.exists() and other.exists() and not stale.exists()
    with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "x").write_text("y")
    assert (tmp_path / "out" / "x").read_text() == "y"


def test_files_keep_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "sub" / "f").stat().st_mode & 0o777 == 0o640
    with pytest.raises(OutputExistsError):
        with atomic_dir(tmp_path / "out"):
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_exits_130_and_leaves_nothing(tmp_path, sig):
    out = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeseq.cli", "export", "--target", "x86", "--width", "0.25", "--quant", "fp32",
         "--flavor", "portable", "-o", str(out)],  # with validation: long enough to interrupt
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob(".b.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(random.uniform(0.2, 3.0))  # wherever the interrupt lands: load, export, validation
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_validation_exits_1(tmp_path, monkeypatch):
    from edgeseq.export import spec

    strict = spec.Tolerance(max_abs_logit=1e-12, top1_agreement=1.0, kl=0.0, drift=1e-12, bpb_delta=0.0)
    monkeypatch.setitem(spec.TOLERANCES, "fp32", strict)
    result = cli("export", "--target", "x86", "--width", "0.25", "--quant", "fp32", "--flavor", "portable",
                 "--steps", "4", "--long-steps", "8", "-o", str(tmp_path / "b"))  # fmt: skip
    assert result.exit_code == 1 and "fail validation" in result.output, result.output
    assert list(Path(tmp_path).iterdir()) == []
