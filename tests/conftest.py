"""Shared test helpers: small random configs and models, fresh seeds per test.

Without a GPU, Triton kernels run through Triton's CPU interpreter. It is chosen here,
before any test module can import triton: ``@triton.jit`` reads ``TRITON_INTERPRET`` when
it decorates, Triton's own library functions included (``tl.cdiv``), so the switch must
precede the first ``import triton`` of the session.
"""

from __future__ import annotations

import os

import pytest
import torch

from edgeseq.config import ModelConfig
from edgeseq.kinds.attention import AttentionParams
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.model import NestedLM

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def small_config(pattern: str = "M M+ S+ M A", *, ngroups: int = 2, **overrides) -> ModelConfig:
    """A few-thousand-parameter hybrid: every mixer kind, grouped B/C, GQA, windowed and
    global attention, MLPs. Nested at 1, 1/2, 1/4."""
    kwargs = dict(
        d_model=32,
        vocab_size=61,
        d_mlp=48,
        window=6,
        mamba=Mamba2Params(d_state=8, headdim=4, ngroups=ngroups, chunk_size=4),
        attention=AttentionParams(n_heads=8, n_kv_heads=4, head_dim=8, rope_fraction=0.5, max_context=128),
        nested_widths=(1.0, 0.5, 0.25),
        tie_embeddings=False,
    )
    kwargs.update(overrides)
    return ModelConfig.from_pattern(pattern, **kwargs)


def random_model(config: ModelConfig, dtype=torch.float64, seed: int | None = None) -> NestedLM:
    """A model with every parameter drawn at random (not the training init), so that
    D, norms and biases are exercised too."""
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    model = NestedLM(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=dtype) * 1.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) - 2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    return model


def randomize_(module: torch.nn.Module, seed: int | None = None) -> int:
    """Overwrite every parameter of any module (e.g. a transformers model) with random
    values as ``random_model`` draws them; returns the seed, for failure messages."""
    seed = seed if seed is not None else int(torch.randint(0, 2**31, ()).item())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 1.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) - 2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return seed


@pytest.fixture
def tiny_config() -> ModelConfig:
    return small_config()


@torch.no_grad()
def hf_parity(hf, ours, cache_kwargs, steps: int = 64, prompt: int = 13, batch: int = 2) -> tuple[float, list[float]]:
    """Max abs logit error of an edgeseq model against transformers' own: at the prefill of
    a random ``prompt``-token prompt (13: not a multiple of any test chunk size) and at each
    of ``steps`` cached single-token decode steps. ``cache_kwargs(out, position)`` is how
    the family hands its cache (and, where it needs them, positions) to the next call."""
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt))
    out = hf(ids, use_cache=True)
    logits, state = ours(ids)
    prefill = (out.logits - logits).abs().max().item()
    errors = []
    for i, token in enumerate(torch.randint(0, vocab, (steps, batch, 1))):
        out = hf(token, use_cache=True, **cache_kwargs(out, torch.full((batch, 1), prompt + i)))
        logits, state = ours.step(token, state)
        errors.append((out.logits[:, -1] - logits).abs().max().item())
    return prefill, errors
