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
