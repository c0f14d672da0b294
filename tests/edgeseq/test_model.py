"""Nested model properties on random small configs (fp64, so only the math can differ)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import ConfigError
from edgeseq.extract import extract
from edgeseq.kinds.attention import AttentionParams
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.state import ModelState
from edgeseq.width import WidthSpec, resolve
from tests.conftest import random_model, small_config


@st.composite
def configs(draw) -> ModelConfig:
    g = draw(st.sampled_from([1, 2]))
    heads = g * draw(st.sampled_from([2, 4]))
    headdim = draw(st.sampled_from([2, 4]))
    expand = draw(st.sampled_from([1, 2]))
    d_model = heads * headdim // expand
    kv = draw(st.sampled_from([2, 4]))
    layers = draw(
        st.lists(
            st.tuples(st.sampled_from(["mamba2", "mamba2", "attention"]), st.booleans()),
            min_size=1,
            max_size=3,
        )
    )
    window = draw(st.sampled_from([None, 3, 5]))
    layers = [LayerSpec.of(mixer, mlp=mlp, window=window if mixer == "attention" else None) for mixer, mlp in layers]
    return ModelConfig(
        d_model=d_model,
        n_layer=len(layers),
        vocab_size=draw(st.integers(5, 40)),
        layers=tuple(layers),
        mamba=Mamba2Params(
            d_state=draw(st.sampled_from([1, 3, 8])),
            headdim=headdim,
            ngroups=g,
            expand=expand,
            d_conv=draw(st.integers(1, 4)),
            chunk_size=draw(st.sampled_from([2, 4, 8])),
        ),
        attention=AttentionParams(
            n_heads=kv * draw(st.sampled_from([1, 2])),
            n_kv_heads=kv,
            head_dim=draw(st.sampled_from([4, 8])),
            rope_fraction=draw(st.sampled_from([0.0, 0.5, 1.0])),
            max_context=64,
        ),
        d_mlp=draw(st.sampled_from([4, 8])),
        tie_embeddings=draw(st.booleans()),
        nested_widths=(1.0, 0.5),
    )


def _widths(config: ModelConfig, draw_bits: list[bool]) -> WidthSpec:
    """A per-layer mix of 1 and 1/2 (every config above has whole units at 1/2)."""
    per_layer = [0.5 if draw_bits[i % len(draw_bits)] else 1.0 for i in range(config.n_layer)]
    return WidthSpec(tuple(per_layer))


PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(config=configs(), l=st.integers(2, 24), cut=st.integers(1, 23), bits=st.lists(st.booleans(), min_size=1, max_size=3))
def test_prefill_then_steps_equals_whole_prefill(config, l, cut, bits):
    model = random_model(config)
    spec = _widths(config, bits)
    ids = torch.randint(0, config.vocab_size, (2, l))
    whole, final = model(ids, width=spec)
    cut = min(cut, l - 1)
    logits, state = model(ids[:, :cut], width=spec)
    torch.testing.assert_close(logits, whole[:, :cut], rtol=1e-9, atol=1e-9)
    for t in range(cut, l):
        step_logits, state = model.step(ids[:, t], state, width=spec)
        torch.testing.assert_close(step_logits, whole[:, t], rtol=1e-9, atol=1e-9)
    for a, b in zip(state.to_named().values(), final.to_named().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@PROPS
@given(config=configs(), l=st.integers(1, 20), bits=st.lists(st.booleans(), min_size=1, max_size=3))
def test_extract_equals_full_model_at_width(config, l, bits):
    model = random_model(config)
    spec = _widths(config, bits)
    sub = extract(model, spec)
    ids = torch.randint(0, config.vocab_size, (2, l))
    want, want_state = model(ids, width=spec)
    got, got_state = sub(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert sub.num_parameters() < model.num_parameters() or all(w == 1.0 for w in spec.fractions)
    for a, b in zip(got_state.to_named().values(), want_state.to_named().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_extract_fp32_and_nested_extraction():
    """fp32 equality, and extracting 1/2 of an extracted 1/2 model gives the 1/4 model."""
    model = random_model(small_config(), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    quarter = extract(model, 0.25)
    half_of_half = extract(extract(model, 0.5), 0.5)
    want, _ = model(ids, width=0.25)
    torch.testing.assert_close(quarter(ids)[0], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(half_of_half(ids)[0], want, rtol=0, atol=1e-5)
    assert quarter.config.nested_widths == (1.0,) and extract(model, 0.5).config.nested_widths == (1.0, 0.5)


def test_grouped_heads_keep_their_group():
    """With ngroups=2, width 1/2 keeps heads {0,1} of group 0 and {4,5} of group 1 (of 8)."""
    config = small_config("M", ngroups=2)
    model = random_model(config)
    sub = extract(model, 0.5)
    full_heads = config.part_size(0, "mamba2")
    assert full_heads == 16 and sub.config.part_size(0, "mamba2") == 8
    kept = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    torch.testing.assert_close(sub.layers[0].mixer.A_log, model.layers[0].mixer.A_log[kept])


def test_narrow_widths_change_the_output():
    """Guard against a width that is silently ignored."""
    model = random_model(small_config())
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    assert not torch.allclose(model(ids, width=0.5)[0], model(ids)[0])


def test_state_is_constant_size_and_fp32_by_default():
    config = small_config()
    model = random_model(config, dtype=torch.float32)
    state = model.init_state(2)
    size = state.nbytes()
    ids = torch.randint(0, config.vocab_size, (2, 40))
    _, state = model(ids, state)
    for t in range(30):
        _, state = model.step(ids[:, t], state)
    assert state.nbytes() == size
    assert all(v.dtype == torch.float32 for k, v in state.to_named().items() if k != "position")
    assert state.position.tolist() == [70, 70]


def test_global_attention_refuses_overlong_streams():
    model = random_model(small_config("A"))
    limit = model.config.attention.max_context
    _, state = model(torch.randint(0, 10, (1, limit)))
    try:
        model.step(torch.tensor([1]), state)
    except ConfigError as e:
        assert "max_context" in str(e)
    else:
        raise AssertionError("stepping past a global cache must fail")


def test_named_state_round_trip():
    config = small_config()
    model = random_model(config)
    _, state = model(torch.randint(0, config.vocab_size, (2, 5)))
    back = ModelState.from_named(config, state.to_named())
    for a, b in zip(back.to_named().values(), state.to_named().values()):
        assert a is b
    assert set(state.to_named()) >= {"0.conv", "0.ssm", "2.key", "2.value", "position"}
    assert resolve(config, 1.0) == resolve(config, "1")
