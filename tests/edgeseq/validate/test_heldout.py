"""The held-out quality gate: same model passes with zero deltas, a damaged one fails."""

from __future__ import annotations

import copy

import pytest
import torch

from edgeseq.export.spec import TOLERANCES, graph_io
from edgeseq.runtimes.torch_runner import TorchRunner
from edgeseq.validate.heldout import heldout_gate, heldout_windows
from tests.conftest import random_model, small_config


@pytest.fixture(scope="module")
def model():
    return random_model(small_config("M M+ M", vocab_size=264), dtype=torch.float32)


def test_windows_are_held_out_bytes():
    w = heldout_windows(3, 20, seed=1)
    assert w.shape == (3, 21) and w.dtype.name == "int64" and w.max() < 256
    assert not (w[0] == w[1]).all()


def test_identical_candidate_passes_with_zero_deltas(model):
    io = graph_io(model.config, "step")
    with TorchRunner(model, "step") as ref, TorchRunner(copy.deepcopy(model), "step") as cand:
        result = heldout_gate(ref, cand, io, "int8", streams=3, tokens=24)
    assert result and result.delta == 0.0 and result.top1_agreement == 1.0 and result.kl == 0.0
    assert result.tokens == 72 and result.reference_bpb > 1.0  # a random model predicts bytes badly
    assert result.to_dict()["limits"]["bpb_delta"] == TOLERANCES["int8"].bpb_delta


def test_damaged_candidate_fails_and_says_why(model):
    io = graph_io(model.config, "step")
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in damaged.named_parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * p.std())  # a broken quantizer: noise as large as the weights
    with TorchRunner(model, "step") as ref, TorchRunner(damaged, "step") as cand:
        result = heldout_gate(ref, cand, io, "int4", streams=3, tokens=24)
    assert not result
    assert any("KL" in f or "top-1" in f or "bits/byte" in f for f in result.failures())
    assert result.summary().startswith("FAIL")


def test_several_candidates_on_one_reference_run_score_as_each_alone(model):
    """``heldout_gates`` runs the reference once for every candidate; each result is the one
    ``heldout_gate`` gives that candidate alone, the damaged one failing as it does alone."""
    from edgeseq.validate.heldout import heldout_gates

    io = graph_io(model.config, "step")
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for p in damaged.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * p.std())
    with TorchRunner(model, "step") as ref, TorchRunner(copy.deepcopy(model), "step") as same, \
            TorchRunner(damaged, "step") as bad:  # fmt: skip
        together = heldout_gates(ref, [same, bad], io, "int4", streams=3, tokens=24)
        alone = [heldout_gate(ref, c, io, "int4", streams=3, tokens=24) for c in (same, bad)]
    assert [r.to_dict() for r in together] == [r.to_dict() for r in alone]
    assert together[0] and not together[1]
