"""Prefill scan and one-layer decode step on a GPU: edgeseq's Triton kernels side by side
with mamba_ssm's Triton kernels (the peer), each row also against its HBM floor (the bytes
that must move / the copy bandwidth measured here). bf16 inputs, fp32 state. Prints a
table and writes JSON.

mamba_ssm is not a dependency: point --peer at an unpacked sdist (its `mamba_ssm/` folder's
parent); its Triton modules are imported without running the package's __init__, which
needs a compiled extension. Its decode row is `selective_state_update` (the SSM update only:
the peer's conv update is a separate CUDA extension not built here), with its conv done by
PyTorch in the same timed call; edgeseq's row is its single fused launch (conv + SSM).

    python3 scripts/bench_kernels.py --peer /path/to/mamba_ssm-2.3.2.post1 --out results.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

SCAN_CASES = [(1, 4096, 24, 64, 128, 1), (1, 32768, 24, 64, 128, 1), (4, 8192, 80, 64, 128, 1)]  # b, l, h, p, n, g
STEP_CASES = [(1, 24, 64, 128, 1), (64, 24, 64, 128, 1)]  # b, h, p, n, g
CHUNK, K = 256, 4


def load_peer(root: Path):
    """mamba_ssm.ops.triton.* from an unpacked sdist, skipping the package __init__ files."""
    for name, rel in (("mamba_ssm", ""), ("mamba_ssm.ops", "ops"), ("mamba_ssm.ops.triton", "ops/triton"),
                      ("mamba_ssm.utils", "utils")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / "mamba_ssm" / rel)]
        sys.modules[name] = mod
    combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    return combined.mamba_chunk_scan_combined, update.selective_state_update


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write), the floor's denominator."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200)
    return 2 * a.numel() / (ms * 1e-3)


def scan_row(case, peer_scan, bw):
    from edgeseq.kernels.ssd_scan import ssd_scan

    b, l, h, p, n, g = case
    dev, bf = "cuda", torch.bfloat16
    X = torch.randn(b, l, h, p, device=dev, dtype=bf)
    dt = F.softplus(torch.randn(b, l, h, device=dev) - 3)
    A = -torch.rand(h, device=dev) * 4 - 0.5
    B, C = (torch.randn(b, l, g, n, device=dev, dtype=bf) for _ in range(2))
    D = torch.randn(h, device=dev)
    s0 = torch.randn(b, h, n, p, device=dev) * 0.1
    ours = do_bench(lambda: ssd_scan(X, dt, A, B, C, CHUNK, D=D, initial_state=s0), warmup=25, rep=200)
    peer = do_bench(lambda: peer_scan(X, dt, A, B, C, CHUNK, D=D, initial_states=s0.transpose(-1, -2).contiguous(),
                                      return_final_states=True), warmup=25, rep=200)
    y, fin = ssd_scan(X, dt, A, B, C, CHUNK, D=D, initial_state=s0)
    y_p, fin_p = peer_scan(X, dt, A, B, C, CHUNK, D=D, initial_states=s0.transpose(-1, -2).contiguous(),
                           return_final_states=True)
    moved = 2 * X.numel() * 2 + dt.numel() * 4 + 2 * B.numel() * 2 + 2 * s0.numel() * 4  # X in, Y out, dt, B, C, states
    return {
        "row": f"scan b={b} l={l} h={h} p={p} n={n} g={g}", "edgeseq_us": ours * 1e3, "peer_us": peer * 1e3,
        "floor_us": moved / bw * 1e6, "max_rel_diff_y": rel(y, y_p), "max_rel_diff_state": rel(fin, fin_p.transpose(-1, -2)),
    }  # fmt: skip


def step_row(case, peer_step, bw):
    from edgeseq.kernels.ssd_step import ssd_step

    b, h, p, n, g = case
    dev = "cuda"
    conv_dim = h * p + 2 * g * n
    xBC = torch.randn(b, conv_dim, device=dev, dtype=torch.bfloat16)
    dt = torch.randn(b, h, device=dev, dtype=torch.bfloat16)
    conv_state = torch.randn(b, conv_dim, K - 1, device=dev, dtype=torch.bfloat16)
    w = torch.randn(conv_dim, K, device=dev) * 0.3
    cb, dt_bias = torch.randn(conv_dim, device=dev), torch.randn(h, device=dev) - 3
    A, D = -torch.rand(h, device=dev) * 4 - 0.5, torch.randn(h, device=dev)
    state = torch.randn(b, h, n, p, device=dev) * 0.1
    ours = do_bench(lambda: ssd_step(xBC, dt, conv_state, w, cb, dt_bias, A, D, state, g), warmup=25, rep=200)
    state_p = state.transpose(-1, -2).contiguous()  # the peer keeps (b, h, p, n)
    A_p = A[:, None, None].expand(h, p, n)
    dt_p, dtb_p, D_p = dt[:, :, None].expand(b, h, p), dt_bias[:, None].expand(h, p), D[:, None].expand(h, p)

    def peer():
        window = torch.cat([conv_state, xBC[..., None]], -1)
        u = F.silu((window * w.to(window.dtype)).sum(-1) + cb)
        x, Bc, Cc = u.split([h * p, g * n, g * n], -1)
        return peer_step(state_p, x.view(b, h, p), dt_p, A_p, Bc.view(b, g, n), Cc.view(b, g, n), D=D_p,
                         dt_bias=dtb_p, dt_softplus=True)

    peer_ms = do_bench(peer, warmup=25, rep=200)
    moved = 2 * state.numel() * 4 + xBC.numel() * 2 + 2 * conv_state.numel() * 2 + w.numel() * 4 + b * h * p * 4
    return {"row": f"step b={b} h={h} p={p} n={n}", "edgeseq_us": ours * 1e3, "peer_us": peer_ms * 1e3,
            "floor_us": moved / bw * 1e6}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", required=True, type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    peer_scan, peer_step = load_peer(args.peer)
    bw = copy_bandwidth()
    rows = [scan_row(c, peer_scan, bw) for c in SCAN_CASES] + [step_row(c, peer_step, bw) for c in STEP_CASES]
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s, median of do_bench")
    print(f"{'case':<40} {'edgeseq us':>10} {'peer us':>9} {'x peer':>7} {'floor us':>9} {'x floor':>8}")
    for r in rows:
        print(f"{r['row']:<40} {r['edgeseq_us']:>10.1f} {r['peer_us']:>9.1f} {r['peer_us'] / r['edgeseq_us']:>7.2f} "
              f"{r['floor_us']:>9.1f} {r['edgeseq_us'] / r['floor_us']:>8.2f}"
              + (f"  diff y {r['max_rel_diff_y']:.1e} state {r['max_rel_diff_state']:.1e}" if "max_rel_diff_y" in r else ""))
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
