"""The runtime-only install: ``pip install edgeseq`` without extras, in a fresh virtual
environment, runs a bundle with no PyTorch and no onnx.

The bundle (the shipped mamba2-tiny at width 1/8) and its golden file are made here, in
the test environment, with the toolchain. The fresh environment then streams, benches and
validates the bundle through its own ``edgeseq``, decodes through
``StreamingSession.from_bundle`` to the same logits as this environment, and turns the
toolchain's commands away with one line. Installing needs pip's index or cache (CI has
both); the rest takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeseq.cli import main
from edgeseq.deploy.bundle import BundleError, read_manifest
from edgeseq.export.spec import GraphIO
from edgeseq.runtimes.session import StreamingSession

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "edgeseq", "export", "kernels", "runtimes", "targets")  # what the wheel holds
TOOLCHAIN = ("torch", "onnx", "onnxscript", "matplotlib")
ATOL = 1e-5  # one graph on one onnxruntime build; only the installs differ


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runtime-only") / "bundle"
    result = CliRunner().invoke(main, ["export", "--target", "x86", "--width", "1/8", "--flavor", "portable",
                                       "--no-validate", "-o", str(root), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def golden(bundle) -> Path:
    """The PyTorch reference's calls on a short prompt and a short decode stream."""
    from edgeseq.deploy.validation import reference_model
    from edgeseq.runtimes.torch_runner import TorchRunner
    from edgeseq.validate import record_golden, save_golden

    manifest = read_manifest(bundle)
    model, _ = reference_model(bundle, manifest, "cpu")
    prompt = np.random.default_rng().integers(0, 256, (1, 7))
    with TorchRunner(model, "step") as reference:
        recorded = record_golden(reference, GraphIO.from_dict(manifest["io"]["step"]), prompts=[prompt], steps=6,
                                 long_steps=0, info={"bundle": str(bundle)})  # fmt: skip
    return save_golden(bundle.parent / "golden.safetensors", recorded)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh environment (no system site packages) with the package installed from a copy
    of its sources, without extras; returns its bin directory. The copy keeps the in-tree
    build (build/, egg-info) out of the shared checkout."""
    tmp = tmp_path_factory.mktemp("venv")
    source = tmp / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    env_dir = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    install = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--quiet",
               "--disable-pip-version-check", str(source)]  # fmt: skip
    done = subprocess.run(install, check=False, capture_output=True, text=True, timeout=900, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return bin_dir


def in_venv(bin_dir: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a program of the fresh environment away from the checkout (whose ``edgeseq/``
    would shadow the installed package) and from this environment's PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=bin_dir.parent, env=env)  # fmt: skip


def test_the_runtime_install_has_no_toolchain(venv):
    for module in TOOLCHAIN:
        result = in_venv(venv, "python", "-c", f"import {module}")
        assert result.returncode != 0 and f"No module named '{module}'" in result.stderr, module
    result = in_venv(venv, "python", "-c", "import onnxruntime, numpy, safetensors, click, rich, tokenizers, edgeseq")
    assert result.returncode == 0, result.stderr
    result = in_venv(venv, "edgeseq", "--help")
    assert result.returncode == 0 and "export" in result.stdout and "run" in result.stdout, result.stderr


def test_run_bench_and_golden_validation_without_torch(venv, bundle, golden):
    result = in_venv(venv, "edgeseq", "run", str(bundle), "--prompt", "def ", "-n", "12", "--temperature", "0",
                     "--threads", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    streamed = json.loads(result.stdout)
    assert streamed["text"].startswith("def ") and streamed["new_tokens"] >= 1 and streamed["flavor"] == "portable"

    result = in_venv(venv, "edgeseq", "bench", str(bundle), "--steps", "3", "--prompt-len", "16", "--threads", "1",
                     "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["runtime"] for r in rows] == ["onnxruntime:portable"]  # no torch row where there is no torch
    assert rows[0]["decode_ms"] > 0 and rows[0]["peak_rss_bytes"] > 0

    result = in_venv(venv, "edgeseq", "validate", str(bundle), "--golden", str(golden), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["passed"] and list(outcome["flavors"]) == ["portable"]


def test_commands_that_need_the_toolchain_say_how_to_get_it(venv, bundle, tmp_path):
    for args in (["export", "--width", "0.5", "-o", str(tmp_path / "out")], ["validate", str(bundle)],
                 ["quantize", str(bundle), "--quant", "int8"], ["plan"], ["generate"]):  # fmt: skip
        result = in_venv(venv, "edgeseq", *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"edgeseq {args[0]} needs the toolchain" in lines[0], (args, result.stderr)
        assert "pip install 'edgeseq[export]'" in lines[0]
    assert not (tmp_path / "out").exists()


SESSION_SNIPPET = """
import json, sys
import numpy as np
from edgeseq.runtimes.session import StreamingSession

bundle, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
with StreamingSession.from_bundle(bundle, threads=1) as session:
    logits = [session.prefill(ids["prompt"])] + [session.step(t) for t in ids["tokens"]]
np.save(out, np.stack(logits))
assert "torch" not in sys.modules and "onnx" not in sys.modules
"""


def decode(bundle: Path, prompt: list[int], tokens: list[int]) -> np.ndarray:
    with StreamingSession.from_bundle(bundle, threads=1) as session:
        return np.stack([session.prefill(prompt)] + [session.step(t) for t in tokens])


def test_from_bundle_in_the_fresh_install_decodes_as_here(venv, bundle, tmp_path):
    rng = np.random.default_rng()
    prompt, tokens = rng.integers(0, 256, int(rng.integers(2, 12))).tolist(), rng.integers(0, 256, 4).tolist()
    out = tmp_path / "logits.npy"
    ids = json.dumps({"prompt": prompt, "tokens": tokens})
    result = in_venv(venv, "python", "-c", SESSION_SNIPPET, str(bundle), ids, str(out))
    assert result.returncode == 0, result.stderr
    there, here = np.load(out), decode(bundle, prompt, tokens)
    assert there.shape == here.shape == (len(tokens) + 1, 264)
    np.testing.assert_allclose(there, here, atol=ATOL, rtol=0)


def test_from_bundle_matches_the_reference(bundle):
    """The session from_bundle opens decodes as the PyTorch reference of the bundle does."""
    from edgeseq.deploy.validation import reference_model
    from edgeseq.runtimes.torch_runner import TorchRunner

    model, _ = reference_model(bundle, read_manifest(bundle), "cpu")
    rng = np.random.default_rng()
    prompt, tokens = rng.integers(0, 256, int(rng.integers(2, 12))).tolist(), rng.integers(0, 256, 4).tolist()
    with TorchRunner(model, "step") as step, TorchRunner(model, "prefill") as prefill, torch.no_grad():
        reference = StreamingSession(step, prefill)
        want = np.stack([reference.prefill(prompt)] + [reference.step(t) for t in tokens])
    with StreamingSession.from_bundle(bundle, threads=1) as session:
        assert session.flavor == "portable" and session.vocab_size == 264 and session.step_runner.is_active
        got = np.stack([session.prefill(prompt)] + [session.step(t) for t in tokens])
        assert session.position == len(prompt) + len(tokens)
    assert not session.step_runner.is_active  # closed on leaving the with block
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # trained logits are O(10)


def test_from_bundle_refuses_a_flavor_the_bundle_lacks(bundle):
    with pytest.raises(BundleError, match=r"no opset27 graphs; it carries \['portable'\]"):
        StreamingSession.from_bundle(bundle, "opset27")
