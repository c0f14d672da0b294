"""Moving a decode state between nested widths (``edgeseq.switch``)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseq.errors import UsageError
from edgeseq.shapes import layer_state_shapes
from edgeseq.switch import narrow, state_moves, widen
from edgeseq.width import WidthSpec, resolve
from tests.conftest import small_config


def _state(config, widths, batch, rng):
    return {f"past.{i}.{k}": rng.standard_normal((batch, *s)).astype(np.float32)
            for i, w in enumerate(widths) for k, s in layer_state_shapes(config, i, w).items()}  # fmt: skip


@pytest.mark.parametrize("wide, thin", [("1", "0.5"), ("1", "0.25"), ("0.5", "0.25")])
def test_narrow_keeps_the_kept_entries_and_widen_puts_them_back(wide, thin):
    rng = np.random.default_rng()
    config = small_config()
    a, b = resolve(config, WidthSpec.parse(wide)), resolve(config, WidthSpec.parse(thin))
    batch = int(rng.integers(1, 4))
    state = _state(config, a, batch, rng)
    moves = state_moves(config, a, b)
    other = state_moves(config, b, a)  # either order: the wider state's kept entries
    assert moves.keys() == other.keys() and all(np.array_equal(moves[k][1], other[k][1]) for k in moves)
    small = narrow(state, moves)
    shapes = {k: (batch, *s) for i, w in enumerate(b) for k, s in
              {f"past.{i}.{n}": s for n, s in layer_state_shapes(config, i, w).items()}.items()}  # fmt: skip
    assert {k: v.shape for k, v in small.items()} == shapes
    back = widen(small, moves, {k: v.shape for k, v in state.items()})
    for name, (axis, index) in moves.items():
        np.testing.assert_array_equal(np.take(back[name], index, axis=axis), np.take(state[name], index, axis=axis))
        assert not np.delete(back[name], index, axis=axis).any()  # what the narrow width lacks starts at zero
    np.testing.assert_array_equal(narrow(back, moves)["past.0.ssm"], small["past.0.ssm"])
    heads = config.mamba.ngroups  # grouped B/C: each group keeps its leading heads, not the first heads overall
    axis, index = moves["past.0.ssm"]
    per_group = a[0]["mamba2"] // heads
    assert axis == 1 and sorted(set(index // per_group)) == list(range(heads))


def test_widths_that_are_not_nested_are_refused():
    config = small_config()
    n = len(config.layers)
    a = resolve(config, WidthSpec.parse(",".join(["1"] + ["0.5"] * (n - 1))))
    b = resolve(config, WidthSpec.parse(",".join(["0.5"] + ["1"] * (n - 1))))
    with pytest.raises(UsageError, match="not nested"):
        state_moves(config, a, b)
