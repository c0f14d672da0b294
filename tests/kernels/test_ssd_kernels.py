"""The SSD Triton kernels against their pure-torch twins, the reference math and the layer.

Without a GPU the kernels run through Triton's interpreter (see conftest.py), so shapes are
tiny. Errors are norm-wise: max |actual - expected| / max |expected|.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from edgeseq.config import ModelConfig
from edgeseq.kernels import ops
from edgeseq.kernels import ssd_scan as scan
from edgeseq.kernels import ssd_step as step
from edgeseq.kernels._common import prune, tuning_space
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.model import NestedLM
from edgeseq.reference import causal_conv1d_ref, ssd_scan_ref, ssd_sequential_ref

triton = pytest.importorskip("triton", reason="the kernels extra is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
CHUNK = 16


def assert_rel(actual, expected, rel, what=""):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def scan_inputs(gen, l, ngroups=2, dtype=torch.float32, init=True, b=2, h=4, p=16, n=16):
    """X (b, l, h, p), dt (b, l, h) > 0, A (h,) < 0, B, C (b, l, g, n), D (h,), state (b, h, n, p)."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    X, B, C = randn(b, l, h, p).to(dtype), randn(b, l, ngroups, n).to(dtype), randn(b, l, ngroups, n).to(dtype)
    dt = F.softplus(randn(b, l, h) - 1).to(dtype)
    A = -torch.exp(torch.rand(h, generator=gen) * 1.5).to(DEVICE)
    state = randn(b, h, n, p) if init else None
    return {"X": X, "dt": dt, "A": A, "B": B, "C": C, "D": randn(h), "initial_state": state}


def in_fp64(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("fused", [False, True], ids=["three_launches", "fused_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init", [True, False], ids=["init", "zero"])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("l", [1, CHUNK - 1, CHUNK + 3, 4 * CHUNK + 5])
def test_scan_matches_reference(l, ngroups, init, dtype, fused):
    """Against the reference in fp64 on the same (possibly bf16-rounded) inputs; both ways
    of computing the states entering the chunks. Four chunks and a bit: blocks left of the
    diagonal (the factored decay) in every chunk but the first row block."""
    gen = torch.Generator().manual_seed(1000 * l + 10 * ngroups + init)
    x = scan_inputs(gen, l, ngroups, dtype, init)
    Y, final = scan.ssd_scan(**x, chunk_size=CHUNK, fused_state=fused)
    Y_ref, final_ref = ssd_scan_ref(**in_fp64(x), chunk_size=CHUNK)
    assert Y.shape == x["X"].shape and Y.dtype == dtype and final.dtype == torch.float32
    assert_rel(Y, Y_ref, TOL[dtype], "Y")
    assert_rel(final, final_ref, TOL[dtype], "final state")


@pytest.mark.parametrize("fused", [False, True], ids=["three_launches", "fused_state"])
@pytest.mark.parametrize("chunk_size", [8, 24, 32])  # below one block, not a power of two, several blocks
def test_scan_chunk_sizes_match_the_recurrence(chunk_size, fused):
    gen = torch.Generator().manual_seed(chunk_size)
    x = scan_inputs(gen, 45, ngroups=2, h=2)
    Y, final = scan.ssd_scan(**x, chunk_size=chunk_size, fused_state=fused)
    Y_seq, final_seq = ssd_sequential_ref(**in_fp64(x))
    assert_rel(Y, Y_seq, 1e-4, "Y")
    assert_rel(final, final_seq, 1e-4, "final state")


def test_scan_reads_strided_views_of_one_projection():
    """X, B, C, dt as slices of one (b, l, features) tensor, as in_proj's output is split."""
    gen = torch.Generator().manual_seed(7)
    b, l, h, p, g, n = 1, 21, 2, 16, 1, 16
    proj = torch.randn(b, l, h * p + 2 * g * n + h, generator=gen).to(DEVICE)
    x, B, C, dt = proj.split([h * p, g * n, g * n, h], dim=-1)
    args = {
        "X": x.unflatten(-1, (h, p)),  # (b, l, h, p), strides of proj
        "dt": F.softplus(dt),
        "A": -torch.rand(h, generator=gen).to(DEVICE),
        "B": B.unflatten(-1, (g, n)),
        "C": C.unflatten(-1, (g, n)),
    }
    assert not args["X"].is_contiguous()
    Y, final = scan.ssd_scan(**args, chunk_size=CHUNK)
    Y_ref, final_ref = scan.ssd_scan_ref(**args, chunk_size=CHUNK)
    assert_rel(Y, Y_ref, 1e-4, "Y")
    assert_rel(final, final_ref, 1e-4, "final state")


def test_scan_of_nothing_returns_the_initial_state():
    x = scan_inputs(torch.Generator().manual_seed(3), 0)
    Y, final = scan.ssd_scan(**x, chunk_size=CHUNK)
    assert Y.shape == (2, 0, 4, 16)
    torch.testing.assert_close(final, x["initial_state"], rtol=0, atol=0)


def step_inputs(gen, ngroups=2, dtype=torch.float32, bias=True, b=2, h=4, p=16, n=16, k=4):
    """The raw in_proj pieces of one token, a conv state and an ssm state, as ``Mamba2Mixer.step`` sees them."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    conv_dim = h * p + 2 * ngroups * n
    return {
        "xBC": randn(b, conv_dim).to(dtype),
        "dt": randn(b, h) - 1,
        "conv_state": randn(b, conv_dim, k - 1),
        "conv_weight": randn(conv_dim, k) * 0.5,
        "conv_bias": randn(conv_dim) if bias else None,
        "dt_bias": randn(h),
        "A": -torch.exp(torch.rand(h, generator=gen)).to(DEVICE),
        "D": randn(h) if bias else None,
        "ssm_state": randn(b, h, n, p),
        "ngroups": ngroups,
        "dt_min": 0.0,
        "dt_max": float("inf"),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias_D", "no_bias_D"])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_step_matches_twin(ngroups, bias, dtype):
    gen = torch.Generator().manual_seed(10 * ngroups + bias)
    x = step_inputs(gen, ngroups, dtype, bias)
    x["dt_min"], x["dt_max"] = (0.05, 1.5) if bias else (0.0, float("inf"))
    before = {k: v.clone() for k, v in x.items() if isinstance(v, torch.Tensor)}
    for got, want, name in zip(step.ssd_step(**x), step.ssd_step_ref(**x), ("y", "conv state", "ssm state")):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert_rel(got, want, 1e-5, name)
    assert all(torch.equal(x[k], v) for k, v in before.items()), "inputs were modified"


def test_step_extends_a_prefill_scan_by_one_token():
    """conv + scan over l tokens, then one fused step == conv + scan over l + 1 tokens."""
    gen = torch.Generator().manual_seed(11)
    x = step_inputs(gen)
    b, h, n, p = x["ssm_state"].shape
    l, g = CHUNK + 2, x["ngroups"]
    xBC = torch.randn(b, l + 1, x["xBC"].size(-1), generator=gen).to(DEVICE)
    dt = torch.randn(b, l + 1, h, generator=gen).to(DEVICE) - 1

    def prefill(tokens):
        u, conv = causal_conv1d_ref(xBC[:, :tokens], x["conv_weight"], x["conv_bias"], x["conv_state"])
        u, B, C = u.split([h * p, g * n, g * n], dim=-1)
        Y, ssm = scan.ssd_scan(u.unflatten(-1, (h, p)), F.softplus(dt[:, :tokens] + x["dt_bias"]), x["A"],
                               B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n)), CHUNK, x["D"], x["ssm_state"])  # fmt: skip
        return Y, conv, ssm

    _, conv, ssm = prefill(l)
    y, conv, ssm = step.ssd_step(**(x | {"xBC": xBC[:, l], "dt": dt[:, l], "conv_state": conv, "ssm_state": ssm}))
    Y_all, conv_all, ssm_all = prefill(l + 1)
    assert_rel(y, Y_all[:, -1], 1e-4, "y")
    assert_rel(conv, conv_all, 1e-6, "conv state")
    assert_rel(ssm, ssm_all, 1e-4, "ssm state")


def test_step_op_inside_the_layer_matches_mixer_step(triton_kernels):
    """Mamba2Mixer.step with its SSM part replaced by the fused op, at full and half width."""
    mamba = Mamba2Params(d_state=16, headdim=16, ngroups=2, chunk_size=CHUNK, dt_limit=(0.01, 2.0))
    config = ModelConfig.from_pattern("M", d_model=32, vocab_size=8, mamba=mamba, nested_widths=(1.0, 0.5))
    torch.manual_seed(5)
    block = NestedLM(config).layers[0].to(DEVICE)
    mixer = block.mixer
    for kept in (4, 2):
        p = block.params_at("mamba2", kept)
        u = torch.randn(3, 32, device=DEVICE)
        conv_dim = p["conv1d.weight"].size(0)
        state = {"conv": torch.randn(3, conv_dim, 3, device=DEVICE), "ssm": torch.randn(3, kept, 16, 16, device=DEVICE)}
        out_ref, state_ref = mixer.step(p, u, state, None, kept)
        z, xBC, dt = mixer._project(p, u, kept)
        y, conv, ssm = ops.ssd_step(xBC, dt, state["conv"], p["conv1d.weight"][:, 0], p["conv1d.bias"], p["dt_bias"],
                                    -torch.exp(p["A_log"]), p["D"], state["ssm"], 2, *mamba.dt_limit)  # fmt: skip
        out = mixer._output(p, y.reshape(3, -1), z, u.dtype)
        assert_rel(out, out_ref, 1e-4, f"layer output at {kept} heads")
        assert_rel(conv, state_ref["conv"], 1e-6, "conv state")
        assert_rel(ssm, state_ref["ssm"], 1e-5, "ssm state")


def test_ops_take_the_kernels_only_when_asked(monkeypatch):
    x = scan_inputs(torch.Generator().manual_seed(2), CHUNK + 3)
    monkeypatch.delenv("EDGESEQ_KERNELS_ON_CPU", raising=False)
    assert ops.use_kernel(x["X"]) == x["X"].is_cuda
    assert not ops.use_kernel(x["X"].double())
    Y_ref, final_ref = scan.ssd_scan_ref(**x, chunk_size=CHUNK)
    Y, final = ops.ssd_scan(**x, chunk_size=CHUNK)
    assert_rel(Y, Y_ref, 0 if DEVICE == "cpu" else 1e-4, "Y")
    monkeypatch.setenv("EDGESEQ_KERNELS_ON_CPU", "1")
    assert ops.use_kernel(x["X"])
    Y, final = ops.ssd_scan(**x, chunk_size=CHUNK)
    assert_rel(Y, Y_ref, 1e-4, "Y")
    assert_rel(final, final_ref, 1e-4, "final state")


@pytest.mark.parametrize("kernel", [False, True], ids=["twin", "kernel"])
def test_opcheck(kernel, monkeypatch):
    """Schema, fake (meta) shapes and dtypes, dispatch: torch.library.opcheck on both paths."""
    monkeypatch.setenv("EDGESEQ_KERNELS_ON_CPU", "1" if kernel else "0")
    gen = torch.Generator().manual_seed(4)
    x = scan_inputs(gen, CHUNK + 1, ngroups=1, dtype=torch.bfloat16, b=1, h=2)
    torch.library.opcheck(torch.ops.edgeseq.ssd_scan, (), dict(x, chunk_size=CHUNK))
    s = step_inputs(gen, b=1, h=2)
    torch.library.opcheck(torch.ops.edgeseq.ssd_step, (), s)


def test_fake_shapes_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        X = torch.empty(2, 37, 4, 16, dtype=torch.bfloat16)
        B = torch.empty(2, 37, 2, 8, dtype=torch.bfloat16)
        Y, final = ops.ssd_scan(X, torch.empty(2, 37, 4), torch.empty(4), B, B, 16)
        assert Y.shape == X.shape and Y.dtype == torch.bfloat16
        assert final.shape == (2, 4, 8, 16) and final.dtype == torch.float32


def test_package_imports_and_runs_twins_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # `import triton` now fails, installed or not
import torch
import edgeseq.kernels as k
from edgeseq.errors import RuntimeUnavailableError
from edgeseq.kernels.ssd_scan import ssd_scan
X, B = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 1, 3)
Y, S = k.ops.ssd_scan(X, torch.rand(1, 5, 2), -torch.rand(2), B, B, 4)
assert Y.shape == X.shape and S.shape == (1, 2, 3, 4)
try:
    ssd_scan(X, X, X, B, B, 4)
except RuntimeUnavailableError:
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scan_at_the_benchmark_shape_on_cuda():
    """B=1 L=4096 H=24 P=64 N=128, bf16, chunk 256 (the shape the kernel is tuned for)."""
    x = scan_inputs(torch.Generator().manual_seed(0), 4096, 1, torch.bfloat16, b=1, h=24, p=64, n=128)
    x["B"], x["C"] = x["B"] / 8, x["C"] / 8  # keep C B^T sums of 128 terms O(1)
    Y, final = scan.ssd_scan(**x, chunk_size=256)
    Y_ref, final_ref = scan.ssd_scan_ref(**x, chunk_size=256)
    assert_rel(Y, Y_ref, 1e-2, "Y")
    assert_rel(final, final_ref, 1e-2, "final state")


def test_tuning_space_is_pruned_to_the_problem():
    """The autotuner only tries tiles that fit the chunk, head dim and state (always at least one)."""
    configs = tuning_space(scan._SCAN_NAMES, scan._SCAN_TILES)
    kept = prune(configs, {"chunk_size": 64, "headdim": 32, "dstate": 128})
    assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_P"] <= 32 for c in kept)
    assert prune(configs, {"chunk_size": 8, "headdim": 4, "dstate": 4}) == configs[:1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_with_kernels_matches_the_reference_model(triton_kernels, dtype):
    """NestedLM.use_kernels(): a prefill (two chunks and a bit) and decode steps, at full and
    half width, against the same weights on the reference path."""


    mamba = Mamba2Params(d_state=16, headdim=16, ngroups=2, chunk_size=CHUNK, dt_limit=(0.001, 5.0))
    config = ModelConfig.from_pattern("M M", d_model=32, vocab_size=40, mamba=mamba, nested_widths=(1.0, 0.5))
    torch.manual_seed(6)
    reference = NestedLM(config).to(device=DEVICE, dtype=dtype)
    fast = NestedLM(config).to(device=DEVICE, dtype=dtype)
    fast.load_state_dict(reference.state_dict())
    fast.use_kernels()
    assert all(b.mixer.kernels for b in fast.layers if hasattr(b.mixer, "kernels"))
    assert not reference.layers[0].mixer.kernels
    ids = torch.randint(0, 40, (2, 2 * CHUNK + 5), device=DEVICE)
    tol = TOL[dtype] if dtype == torch.float32 else 3e-2  # bf16 weights: the paths round X, B, C differently
    for width in (1.0, 0.5):
        logits_ref, state_ref = reference(ids, width=width)
        logits, state = fast(ids, width=width)
        assert_rel(logits, logits_ref, tol, f"prefill logits at width {width}")
        for _ in range(3):
            nxt = logits_ref[:, -1].argmax(-1) if logits_ref.dim() == 3 else logits_ref.argmax(-1)
            logits_ref, state_ref = reference.step(nxt, state_ref, width=width)
            logits, state = fast.step(nxt, state, width=width)
            assert_rel(logits, logits_ref, tol, f"decode logits at width {width}")
        for got, want in zip(state.to_named().values(), state_ref.to_named().values()):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert_rel(got.float(), want.float(), tol, "state")
