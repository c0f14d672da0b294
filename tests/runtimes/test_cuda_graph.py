"""GraphedDecoder: the model's step replayed from a CUDA graph equals the eager step."""

from __future__ import annotations

import pytest
import torch

from edgeseq.errors import ConfigError, RuntimeUnavailableError
from edgeseq.runtimes.cuda_graph import GraphedDecoder
from tests.conftest import random_model, small_config


def test_needs_a_model_on_cuda():
    model = random_model(small_config("M M+", ngroups=1), dtype=torch.float32)
    with pytest.raises(RuntimeUnavailableError, match="CUDA"):
        GraphedDecoder(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_graph_replay_equals_the_eager_step(dtype, kernels):
    model = random_model(small_config(), dtype=dtype).cuda().use_kernels(kernels)  # Mamba2, windowed and global attention
    batch, vocab = 3, model.config.vocab_size
    decoder = GraphedDecoder(model, batch=batch)
    prompt = torch.randint(0, vocab, (batch, 9), device="cuda")
    with torch.no_grad():
        logits_eager, state = model(prompt, last_only=True)
    logits = decoder.prefill(prompt)
    torch.testing.assert_close(logits, logits_eager, rtol=0, atol=0)
    for _ in range(12):
        token = logits_eager.argmax(-1)
        with torch.no_grad():
            logits_eager, state = model.step(token, state)
        logits = decoder.step(token)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(logits, logits_eager, rtol=tol, atol=tol)
    for got, want in zip(decoder.state.to_named().values(), state.to_named().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    decoder.reset()
    assert all(int(t.abs().sum()) == 0 for t in decoder.state.to_named().values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_refuses_a_stream_past_the_global_cache():
    config = small_config()
    model = random_model(config, dtype=torch.float32).cuda()
    decoder = GraphedDecoder(model, batch=1)
    limit = config.attention.max_context
    decoder.prefill(torch.zeros(1, limit - 1, dtype=torch.int64, device="cuda"))
    decoder.step(torch.zeros(1, dtype=torch.int64, device="cuda"))
    with pytest.raises(ConfigError, match="global attention cache"):
        decoder.step(torch.zeros(1, dtype=torch.int64, device="cuda"))
