"""Config JSON round trip and validation."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeseq.config import ModelConfig
from edgeseq.errors import ConfigError
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.zoo import BUILTIN
from tests.conftest import small_config


@pytest.mark.parametrize("config", [small_config(), *BUILTIN.values()], ids=["small", *BUILTIN])
def test_json_round_trip(config):
    text = config.to_json()
    assert ModelConfig.from_json(text) == config
    assert json.loads(text)["mamba"]["dt_limit"][1] is None  # inf is stored as null, JSON stays strict


@settings(max_examples=30, deadline=None)
@given(lo=st.floats(0, 0.5), span=st.floats(0.01, 10) | st.just(math.inf), eps=st.floats(1e-8, 1e-2))
def test_round_trip_keeps_floats(lo, span, eps):
    config = small_config(norm_eps=eps, mamba=Mamba2Params(d_state=8, headdim=4, ngroups=2, dt_limit=(lo, lo + span)))
    assert ModelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d.update(d_model=0), "d_model"),
        (lambda d: d["mamba"].update(d_state=-3), "d_state"),
        (lambda d: d["mamba"].update(ngroups=3), "ngroups"),
        (lambda d: d["mamba"].update(headdim=5), "whole number"),
        (lambda d: d.update(n_layer=7), "n_layer"),
        (lambda d: d.update(colour="red"), "unknown keys"),
        (lambda d: d["attention"].update(n_kv_heads=3), "n_kv_heads"),
        (lambda d: d["layers"][0].update(mixers=["lstm"]), "unknown layer kind"),
        (lambda d: d["layers"][0].update(window=4), "window"),
        (lambda d: d.update(nested_widths=[1.0, 0.0]), "nested_widths"),
        (lambda d: d.update(norm_eps=2.0), "norm_eps"),
        (lambda d: d["mamba"].update(dt_limit=[0.5, 0.1]), "dt_limit"),
        (lambda d: d.pop("vocab_size"), "missing"),
    ],
)
def test_out_of_range_values_are_refused(mutate, words):
    d = small_config().to_dict()
    mutate(d)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(d)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_embedding_scale_round_trips_and_is_checked():
    config = small_config(embedding_scale=12.0)
    assert ModelConfig.from_json(config.to_json()).embedding_scale == 12.0
    assert "embedding_scale" not in small_config().to_dict()  # configs without it are unchanged
    for bad in (0.0, -1.0, float("inf"), "2"):
        with pytest.raises(ConfigError, match="embedding_scale"):
            small_config(embedding_scale=bad)
