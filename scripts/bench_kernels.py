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
from triton.testing import do_bench, do_bench_cudagraph

SCAN_CASES = [(1, 4096, 24, 64, 128, 1), (1, 32768, 24, 64, 128, 1), (4, 8192, 80, 64, 128, 1)]  # b, l, h, p, n, g
STEP_CASES = [(1, 24, 64, 128, 1), (64, 24, 64, 128, 1)]  # b, h, p, n, g
CHUNK, K = 256, 4


def load_peer(root: Path):
    """mamba_ssm.ops.triton.* from an unpacked sdist, skipping the package __init__ files."""
    for name, rel in (
        ("mamba_ssm", ""),
        ("mamba_ssm.ops", "ops"),
        ("mamba_ssm.ops.triton", "ops/triton"),
        ("mamba_ssm.utils", "utils"),
    ):
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / "mamba_ssm" / rel)]
        sys.modules[name] = mod
    combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    return combined.mamba_chunk_scan_combined, update.selective_state_update


def timed(fn) -> dict[str, float]:
    """Median µs of do_bench (launches from Python, L2 flushed between runs; what a caller
    sees) and of do_bench_cudagraph (the same work replayed from a CUDA graph: GPU time)."""
    return {
        "us": do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3,
        "graph_us": do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3,
    }


def kernel_split(fn, steps: int = 20) -> dict[str, float]:
    """GPU µs per call of each kernel fn launches (torch.profiler), to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: e.device_time_total / steps for e in prof.key_averages() if e.device_time_total > 0}


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write), the floor's denominator."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200)
    return 2 * a.numel() / (ms * 1e-3)


def scan_row(case, peer_scan, bw, split=False):
    from edgeseq.kernels.ssd_scan import ssd_scan

    b, l, h, p, n, g = case
    dev, bf = "cuda", torch.bfloat16
    X = torch.randn(b, l, h, p, device=dev, dtype=bf)
    dt = F.softplus(torch.randn(b, l, h, device=dev) - 3)
    A = -torch.rand(h, device=dev) * 4 - 0.5
    B, C = (torch.randn(b, l, g, n, device=dev, dtype=bf) for _ in range(2))
    D = torch.randn(h, device=dev)
    s0 = torch.randn(b, h, n, p, device=dev) * 0.1
    s0_peer = s0.transpose(-1, -2).contiguous()  # the peer keeps (b, h, p, n): laid out once, outside the timing

    def ours():
        return ssd_scan(X, dt, A, B, C, CHUNK, D=D, initial_state=s0)

    def peer():
        return peer_scan(X, dt, A, B, C, CHUNK, D=D, initial_states=s0_peer, return_final_states=True)

    def peer_plain():  # no initial state in, no final state out
        return peer_scan(X, dt, A, B, C, CHUNK, D=D)

    fused = b * h >= torch.cuda.get_device_properties(0).multi_processor_count  # ssd_scan's own choice

    def ours_other_path():  # the way of computing the chunk states that ssd_scan did not choose
        return ssd_scan(X, dt, A, B, C, CHUNK, D=D, initial_state=s0, fused_state=not fused)

    row = {"row": f"scan b={b} l={l} h={h} p={p} n={n} g={g}"}
    row |= {f"edgeseq_{k}": v for k, v in timed(ours).items()}
    row |= {f"peer_{k}": v for k, v in timed(peer).items()}
    row |= {f"peer_plain_{k}": v for k, v in timed(peer_plain).items()}
    row["edgeseq_path"] = "fused state pass (2 launches)" if fused else "chunk states + passing (3 launches)"
    row["edgeseq_other_path_graph_us"] = timed(ours_other_path)["graph_us"]
    (y, fin), (y_p, fin_p) = ours(), peer()
    moved = 2 * X.numel() * 2 + dt.numel() * 4 + 2 * B.numel() * 2 + 2 * s0.numel() * 4  # X in, Y out, dt, B, C, states
    row |= {
        "floor_us": moved / bw * 1e6,
        "max_rel_diff_y": rel(y, y_p),
        "max_rel_diff_state": rel(fin, fin_p.transpose(-1, -2)),
    }
    if split:
        row["kernels_edgeseq"], row["kernels_peer"] = kernel_split(ours), kernel_split(peer)
        row["kernels_edgeseq_other_path"] = kernel_split(ours_other_path)
    return row


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
    state_p = state.transpose(-1, -2).contiguous()  # the peer keeps (b, h, p, n)
    A_p = A[:, None, None].expand(h, p, n)
    dt_p, dtb_p, D_p = dt[:, :, None].expand(b, h, p), dt_bias[:, None].expand(h, p), D[:, None].expand(h, p)

    def ours():
        return ssd_step(xBC, dt, conv_state, w, cb, dt_bias, A, D, state, g)

    def peer_update(u):  # selective_state_update on conv output (or raw xBC) u
        x, Bc, Cc = u.split([h * p, g * n, g * n], -1)
        return peer_step(state_p, x.view(b, h, p), dt_p, A_p, Bc.view(b, g, n), Cc.view(b, g, n), D=D_p,
                         dt_bias=dtb_p, dt_softplus=True)  # fmt: skip

    def peer():  # PyTorch's conv update, then the peer's SSM update
        window = torch.cat([conv_state, xBC[..., None]], -1)
        return peer_update(F.silu((window * w.to(window.dtype)).sum(-1) + cb))

    def peer_ssm_only():  # selective_state_update alone, the conv left out
        return peer_update(xBC)

    row = {"row": f"step b={b} h={h} p={p} n={n}"}
    row |= {f"edgeseq_{k}": v for k, v in timed(ours).items()}
    row |= {f"peer_{k}": v for k, v in timed(peer).items()}
    row |= {f"peer_ssm_only_{k}": v for k, v in timed(peer_ssm_only).items()}
    moved = 2 * state.numel() * 4 + xBC.numel() * 2 + 2 * conv_state.numel() * 2 + w.numel() * 4 + b * h * p * 4
    return row | {"floor_us": moved / bw * 1e6}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", required=True, type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--split", action="store_true", help="also profile each kernel's GPU time")
    args = ap.parse_args()
    peer_scan, peer_step = load_peer(args.peer)
    bw = copy_bandwidth()
    rows = [scan_row(c, peer_scan, bw, args.split) for c in SCAN_CASES] + [
        step_row(c, peer_step, bw) for c in STEP_CASES
    ]
    print(
        f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s; median µs of do_bench (graph: do_bench_cudagraph)"
    )
    print(
        f"{'case':<38} {'edgeseq':>8} {'peer':>8} {'x peer':>7} {'graph':>8} {'peer gr':>8} {'x peer':>7} {'floor':>7} {'x floor':>8}"
    )
    for r in rows:
        print(
            f"{r['row']:<38} {r['edgeseq_us']:>8.1f} {r['peer_us']:>8.1f} {r['peer_us'] / r['edgeseq_us']:>7.2f} "
            f"{r['edgeseq_graph_us']:>8.1f} {r['peer_graph_us']:>8.1f} {r['peer_graph_us'] / r['edgeseq_graph_us']:>7.2f} "
            f"{r['floor_us']:>7.1f} {r['edgeseq_graph_us'] / r['floor_us']:>8.2f}"
        )
    for r in rows:
        extra = {
            k: round(v, 1) for k, v in r.items() if k.startswith("peer_") and k not in ("peer_us", "peer_graph_us")
        }
        print(r["row"], extra, {k: f"{r[k]:.1e}" for k in ("max_rel_diff_y", "max_rel_diff_state") if k in r})
        for who in ("kernels_edgeseq", "kernels_edgeseq_other_path", "kernels_peer"):
            for name, us in r.get(who, {}).items():
                print(f"    {who[8:]:<18} {us:>8.1f} us  {name}")
    if args.out:
        args.out.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
