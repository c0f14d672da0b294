"""Width specs: parsing, snapping to whole units, and refusals."""

from __future__ import annotations

import pytest

from edgeseq.errors import WidthError
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.width import WidthSpec, resolve
from tests.conftest import small_config


def test_uniform_width_per_unit_kind():
    config = small_config()  # mamba2: 16 heads in 2 groups; attention: 8 q heads, 4 kv; MLP 48
    widths = resolve(config, 0.5)
    assert [w.to_dict() for w in widths] == [
        {"mamba2": 8}, {"mamba2": 8, "mlp": 24}, {"attention": 4, "mlp": 24}, {"mamba2": 8}, {"attention": 4},
    ]


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("1/4", 0.25), (" 1 ", 1.0)])
def test_parse(text, value):
    assert WidthSpec.parse(text).fractions == (value,)


def test_snapping_accepts_rounded_fractions():
    config = small_config("M M", mamba=Mamba2Params(d_state=8, headdim=4, ngroups=1, expand=3))
    heads = config.part_size(0, "mamba2")  # 24
    assert resolve(config, 0.33)[0]["mamba2"] == round(heads / 3)
    assert resolve(config, "1/3")[0]["mamba2"] == heads // 3


def test_non_finite_fraction_is_out_of_range():
    with pytest.raises(WidthError, match="out of range"):
        resolve(small_config(), WidthSpec((float("nan"),)))


def test_mix_and_match():
    config = small_config()
    widths = resolve(config, "1,0.5,0.25,1,0.5")
    assert [w[s.mixers[0]] for w, s in zip(widths, config.layers)] == [16, 8, 2, 16, 4]


@pytest.mark.parametrize(
    "spec, words",
    [
        ("0", "out of range"),
        ("-0.5", "out of range"),
        ("1.5", "out of range"),
        ("nan", "not a number"),
        ("abc", "not a number"),
        ("0.3", "use 0.25"),  # 8 heads per group: 0.3 lies between 2/8 and 3/8
        ("0.05", "narrowest"),
        ("1,0.5", "per-layer widths"),
        ("", "empty"),
    ],
)
def test_bad_widths(spec, words):
    with pytest.raises(WidthError) as err:
        resolve(small_config(), spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_snapped_width_is_shown_as_what_it_keeps():
    from edgeseq.width import exact_width

    config = small_config("M M", mamba=Mamba2Params(d_state=8, headdim=4, ngroups=1, expand=3))  # 24 heads
    assert exact_width(config, WidthSpec.parse("0.3")) == "7/24 = 0.2917"
    assert exact_width(config, WidthSpec.parse("1/3")) == "1/3 = 0.3333"
    assert exact_width(config, WidthSpec.parse("0.5")) == "0.5"
    assert WidthSpec.parse("7/24").fractions[0] * 24 == pytest.approx(7)  # the label parses back


def test_untrained_widths_warn_with_the_nearest_trained_ones():
    from edgeseq.width import untrained_warning

    config = small_config()  # trained at 1, 1/2, 1/4; 16 mamba2 heads in 2 groups, 4 kv heads, MLP 48
    assert untrained_warning(config, WidthSpec.parse("0.5")) is None
    assert untrained_warning(config, WidthSpec.parse("1,0.5,0.25,1,0.5")) is None  # Mix'n'Match of trained widths
    warning = untrained_warning(config, WidthSpec.parse("0.75"))
    assert warning is not None and "0.5 and 1" in warning and "edgeseq eval" in warning and "\n" not in warning
    assert "some layers" in untrained_warning(config, WidthSpec.parse("1,0.75,0.25,1,0.5"))
    once = config.replace(nested_widths=(1.0,))
    assert "not trained nested" in untrained_warning(once, WidthSpec.parse("0.5"))
