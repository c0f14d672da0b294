"""Every bad input a user can hand edgeseq: the exact error class, a one-line message that
says what to do, and, where a write was involved, nothing half-written left on disk."""

from __future__ import annotations

import errno
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import edgeseq.families.native
from edgeseq.config import ModelConfig
from edgeseq.errors import (
    CheckpointError,
    ConfigError,
    EdgeseqError,
    OutputExistsError,
    UnknownFormatError,
    WidthError,
)
from edgeseq.families import FAMILIES, load_checkpoint, save_checkpoint
from edgeseq.width import WidthSpec, resolve
from tests.conftest import random_model, small_config

# A message says what to do when it names a remedy or states the valid values.
REMEDY = re.compile(
    r"\b(re-export|re-download|regenerate|fix|use|give|add|set|choose|pick|pass|put|convert|check|raise|must|known)\b"
)


def assert_user_error(excinfo: pytest.ExceptionInfo, cls: type[EdgeseqError]) -> str:
    """The exact class (not merely a subclass), one line, with a remedy. Returns the message."""
    err = excinfo.value
    assert type(err) is cls, f"{type(err).__name__} raised, {cls.__name__} expected: {err}"
    msg = str(err)
    assert msg and "\n" not in msg, msg
    assert REMEDY.search(msg), f"message does not say what to do: {msg}"
    return msg


def listing(path) -> set[str]:
    """Every entry beside (and under) ``path``'s parent, hidden temp dirs included."""
    return {str(p.relative_to(path.parent)) for p in path.parent.rglob("*")}


@pytest.fixture
def saved(tmp_path):
    """A native checkpoint of a random hybrid (fp32) and its model."""
    model = random_model(small_config(), torch.float32)
    return save_checkpoint(model, tmp_path / "model"), model


def rewrite_tensors(path, edit):
    """Apply ``edit`` to the tensors of a native checkpoint's model.safetensors."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


# ---- damaged checkpoint files ------------------------------------------------------------
def test_missing_safetensors(saved):
    path, _ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "model.safetensors not found" in assert_user_error(e, CheckpointError)


def test_truncated_safetensors(saved):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "truncated or corrupt" in assert_user_error(e, CheckpointError)


@pytest.mark.parametrize("where", ["header length", "header json"])
def test_corrupted_safetensors_header(saved, where):
    path, _ = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    if where == "header length":  # the u64 length prefix claims more bytes than the file has
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    else:  # garbage inside the JSON header
        data[8:40] = torch.randint(0, 256, (32,), dtype=torch.uint8).numpy().tobytes()
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "truncated or corrupt" in assert_user_error(e, CheckpointError)


def test_missing_tensor_is_named(saved):
    path, _ = saved
    victim = "layers.1.mixer.D"
    rewrite_tensors(path, lambda t: t.pop(victim))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert victim in assert_user_error(e, CheckpointError)


def test_wrong_shape_is_named(saved):
    path, _ = saved
    victim = "layers.2.mixer.k_proj.weight"

    def widen(t):
        t[victim] = torch.randn(t[victim].size(0) + 8, t[victim].size(1))

    rewrite_tensors(path, widen)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert victim in assert_user_error(e, CheckpointError)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(saved, value):
    """Decision: edgeseq REFUSES NaN/Inf weights at load time (CheckpointError naming the
    tensor) instead of loading them and warning. A non-finite weight poisons every logit
    downstream of it, and the failure would otherwise surface far away: as NaN outputs, a
    validation mismatch after export, or garbage on a device."""
    path, _ = saved
    victim = "layers.3.mixer.in_proj.weight"

    def poison(t):
        flat = t[victim].view(-1)
        flat[torch.randint(0, flat.numel(), ())] = value

    rewrite_tensors(path, poison)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert victim in assert_user_error(e, CheckpointError)


def test_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    """A pytorch_model.bin whose unpickling would call open(marker, "w"): edgeseq reads .bin
    files only with torch.load(weights_only=True), so it refuses the file and the marker is
    never created. The unsafe load at the end proves the payload is live."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 64,
                                                  "ssm_cfg": {"layer": "Mamba2"}}))  # fmt: skip
    torch.save({"backbone.embedding.weight": torch.zeros(64, 32), "x": Payload()}, path / "pytorch_model.bin")

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "pytorch_model.bin" in assert_user_error(e, CheckpointError)
    assert not marker.exists()

    torch.load(path / "pytorch_model.bin", weights_only=False)["x"].close()  # the control: unsafe loading runs it
    assert marker.exists()


# ---- unknown formats ---------------------------------------------------------------------
def test_unknown_format_name_lists_known_formats(saved):
    path, _ = saved
    with pytest.raises(UnknownFormatError) as e:
        load_checkpoint(path, format="gguf")
    msg = assert_user_error(e, UnknownFormatError)
    assert all(name in msg for name in FAMILIES)


def test_undetectable_directory_lists_known_formats(tmp_path):
    (tmp_path / "weights.onnx").write_bytes(b"\x08\x01")
    with pytest.raises(UnknownFormatError) as e:
        load_checkpoint(tmp_path)
    msg = assert_user_error(e, UnknownFormatError)
    assert all(name in msg for name in FAMILIES)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "absent")
    assert "does not exist" in assert_user_error(e, CheckpointError)


# ---- config values ---------------------------------------------------------------------
def set_key(doc, dotted, value):
    *parents, key = dotted.split(".")
    for p in parents:
        doc = doc[p]
    doc[key] = value


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("d_model", 0, "config.d_model must be an integer ≥ 1"),
        ("mamba.d_state", -8, "config.mamba.d_state must be an integer ≥ 1"),
        ("mamba.ngroups", 3, "must be a multiple of config.mamba.ngroups (3)"),  # 16 heads
        ("d_modle", 32, "unknown keys ['d_modle']"),
        ("attention.n_kv_heads", 3, "must be a multiple of n_kv_heads (3)"),
        ("norm_eps", -1e-5, "config.norm_eps must be in (0, 1)"),
    ],
)
def test_config_value_out_of_range(saved, key, value, words):
    path, _ = saved
    doc = json.loads((path / "config.json").read_text())
    set_key(doc, key, value)
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as e:
        load_checkpoint(path)
    assert words in assert_user_error(e, ConfigError)


def test_malformed_config_json(saved):
    path, _ = saved
    (path / "config.json").write_text((path / "config.json").read_text()[:-20])
    for fmt in ("native", None):  # detection too reports the damaged JSON, not an unknown format
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, format=fmt)
        assert "not valid JSON" in assert_user_error(e, CheckpointError)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json((path / "config.json").read_text())
    assert "not valid JSON" in assert_user_error(e, ConfigError)


# ---- widths ------------------------------------------------------------------------------
# small_config: mamba2 layers keep 8 heads per group, attention 4 kv groups, MLPs 48 units
BAD_WIDTHS = [0.0, -0.5, 1.5, math.nan, math.inf, 0.3]


@pytest.mark.parametrize("width", BAD_WIDTHS)
def test_bad_width_spec(width):
    config = small_config()
    with pytest.raises(WidthError) as e:
        resolve(config, WidthSpec.uniform(width))
    assert_user_error(e, WidthError)


@pytest.mark.parametrize("width", [*BAD_WIDTHS, "abc", "1,0.5"])
def test_bad_width_in_forward(width):
    model = random_model(small_config(), torch.float32)
    with pytest.raises(WidthError) as e:
        model(torch.randint(0, 61, (1, 5)), width=width)
    assert_user_error(e, WidthError)


def test_width_off_a_head_boundary_names_the_neighbours():
    with pytest.raises(WidthError) as e:
        resolve(small_config(), 0.3)  # 2.4 of 8 heads per group
    assert "0.25 (2/8) or 0.375 (3/8)" in assert_user_error(e, WidthError)


# ---- atomic writes -------------------------------------------------------------------------
def failing_save(written: list):
    """A safetensors writer that leaves half a file, then fails as a full disk would."""

    def save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)
        written.append(filename)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = random_model(small_config(), torch.float32)
    target = tmp_path / "out" / "model"
    target.parent.mkdir()
    before = listing(target)
    written = []
    monkeypatch.setattr(edgeseq.families.native, "save_file", failing_save(written))
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(model, target)
    assert "nothing was written" in assert_user_error(e, CheckpointError)
    assert written, "the write never started: the test exercised nothing"
    assert not target.exists()
    assert listing(target) == before  # no temp directory left beside it


def test_failed_overwrite_keeps_the_old_checkpoint(saved, monkeypatch):
    path, _ = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    siblings = listing(path)
    written = []
    monkeypatch.setattr(edgeseq.families.native, "save_file", failing_save(written))
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(random_model(small_config(), torch.float32), path, overwrite=True)
    assert_user_error(e, CheckpointError)
    assert written
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert listing(path) == siblings


def test_existing_target_without_overwrite_is_refused(saved):
    path, model = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    siblings = listing(path)
    with pytest.raises(OutputExistsError) as e:
        save_checkpoint(model, path)
    assert "overwrite" in assert_user_error(e, OutputExistsError)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert listing(path) == siblings


def test_overwriting_a_file_leaves_no_stale_copy(tmp_path):
    target = tmp_path / "model"
    target.write_text("not a checkpoint")
    save_checkpoint(random_model(small_config(), torch.float32), target, overwrite=True)
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
