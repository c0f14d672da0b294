"""Snapshot, restore, fork and the prefix cache on bundles of both shipped models (onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeseq.deploy.pipeline import ExportRequest, export_bundle
from edgeseq.runtimes.prefix_cache import PrefixCache, PrefixCacheError
from edgeseq.runtimes.session import StateError, StreamingSession
from edgeseq.width import WidthSpec

MODELS = ["mamba2-tiny", "hybrid-tiny"]
# prefix + rest vs the whole prompt in one prefill: the chunked scan splits elsewhere (fp32 rounding)
ATOL = 1e-4


@pytest.fixture(scope="module", params=MODELS)
def bundle(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("state") / request.param
    req = ExportRequest(model=request.param, target="x86", width=WidthSpec.parse("1/4"), output=root,
                        flavor="portable", precision="fp32", validate=False)  # fmt: skip
    export_bundle(req)
    return root


def open_session(bundle: Path, batch: int = 1) -> StreamingSession:
    return StreamingSession.from_bundle(bundle, batch=batch, threads=1)


def test_restore_gives_bit_identical_logits(bundle):
    rng = np.random.default_rng()
    with open_session(bundle, batch=2) as s:
        v = s.vocab_size
        s.prefill(rng.integers(0, v, (2, int(rng.integers(2, 12)))))
        for t in rng.integers(0, v, (int(rng.integers(0, 6)), 2)):
            s.step(t)
        snap, pos = s.snapshot(), s.position.copy()
        assert snap.nbytes == s.state_bytes + 8 * 2 and s.state_bytes > 0
        tokens = rng.integers(0, v, (5, 2))
        first = [s.step(t) for t in tokens]
        s.restore(snap)
        assert np.array_equal(s.position, pos)
        again = [s.step(t) for t in tokens]
        for a, b in zip(first, again):
            assert np.array_equal(a, b)
        s.restore(snap)  # the snapshot survives a restore
        assert np.array_equal(s.step(tokens[0]), first[0])


def test_restore_refuses_another_batch(bundle):
    with open_session(bundle) as one, open_session(bundle, batch=2) as two, pytest.raises(StateError):
        two.restore(one.snapshot())


def test_fork_is_independent_and_matches_a_fresh_session(bundle):
    rng = np.random.default_rng()
    with open_session(bundle) as s, open_session(bundle) as fresh:
        v = s.vocab_size
        prompt = rng.integers(0, v, int(rng.integers(2, 12)))
        s.prefill(prompt)
        f = s.fork()
        assert f.step_runner is s.step_runner and f.prefill_runner is s.prefill_runner
        ours, theirs = rng.integers(0, v, 4), rng.integers(0, v, 4)
        for a, b in zip(ours, theirs):
            s.step(int(a))
            got = f.step(int(b))
        fresh.prefill(prompt)
        for b in theirs:
            want = fresh.step(int(b))
        assert np.array_equal(got, want)
        assert f.position == s.position == len(prompt) + 4


def test_prefix_cache_hits_reuses_and_matches(bundle):
    rng = np.random.default_rng()
    with open_session(bundle) as s, open_session(bundle) as plain:
        v = s.vocab_size
        system = rng.integers(0, v, int(rng.integers(20, 60))).tolist()
        turn1, turn2 = (rng.integers(0, v, int(rng.integers(1, 8))).tolist() for _ in range(2))
        cache = PrefixCache(max_bytes=16 * s.state_bytes)
        s.prefill(system, cache=cache)
        assert (cache.hits, cache.misses) == (0, 1)
        again = s.prefill(system, cache=cache)  # whole prompt cached
        assert cache.hits == 1 and np.array_equal(again, plain.prefill(system))
        got = s.prefill(system + turn2, cache=cache)  # shares the system prefix
        assert cache.hits == 2 and cache.reused_tokens == 2 * len(system)
        plain.reset()
        want = plain.prefill(system + turn2)
        err = float(np.abs(got - want).max())
        print(f"max abs logit error, cached prefix vs whole prompt: {err:.2e}")
        assert err <= ATOL and np.argmax(got) == np.argmax(want)
        assert s.position == len(system) + len(turn2)
        s.prefill(turn1, cache=cache)  # no shared prefix: from zero
        assert cache.misses == 2 and s.position == len(turn1)


def test_prefix_cache_eviction_keeps_its_bound(bundle):
    rng = np.random.default_rng()
    with open_session(bundle) as s:
        v = s.vocab_size
        per_entry = s.state_bytes + 8 + 4 * v
        cache = PrefixCache(max_bytes=2 * per_entry + per_entry // 2)
        prompts = [rng.integers(0, v, 3).tolist() for _ in range(4)]
        for p in prompts:
            s.prefill(p, cache=cache)
            assert cache.nbytes <= cache.max_bytes
        assert len(cache) == 2 and prompts[0] not in cache and prompts[-1] in cache
        s.prefill(prompts[2], cache=cache)  # most recent now; prompts[3] goes first
        s.prefill(prompts[0], cache=cache)
        assert prompts[2] in cache and prompts[3] not in cache
        with pytest.raises(PrefixCacheError):
            PrefixCache(max_bytes=-1)
