"""Built-in names resolve to the shipped checkpoint, or to a seeded untrained model
when the weights are absent (a partial checkout)."""

from __future__ import annotations

import pytest
import torch

from edgeseq import zoo
from edgeseq.errors import CheckpointError


def test_missing_weights_fall_back_to_a_seeded_untrained_model(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "builtin_dir", lambda name: tmp_path / name)
    a, meta = zoo.load_model("hybrid-tiny")
    b, _ = zoo.load_model("hybrid-tiny")
    assert meta == {"format": "builtin", "name": "hybrid-tiny", "trained": False}
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_unknown_names_and_formats_say_what_is_known():
    with pytest.raises(CheckpointError, match="built-in model"):
        zoo.load_model("mamba3-huge")
    with pytest.raises(CheckpointError, match="native only"):
        zoo.load_model("mamba2-tiny", format="hf")


def test_seeding_does_not_touch_the_callers_rng(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "builtin_dir", lambda name: tmp_path / name)
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    zoo.load_model("mamba2-tiny")
    assert torch.equal(torch.rand(4), want)
