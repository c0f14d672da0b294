"""edgeseq against llama.cpp on this CPU: decode, prefill and file size of the same weights.

The peer and the shared model come from ``../shared/tools/build_llamacpp_peer.sh``: a
random-weight Mamba2 130M checkpoint (HF format) and llama.cpp's own conversion of it to
F32 / Q8_0 / Q4_0 GGUF files, plus ``llama-bench``. Per precision (edgeseq / llama.cpp):

    edgeseq    ``edgeseq export --target x86 --width 1 --quant P --no-validate`` of the
               checkpoint (``--flavor``, default the target's first), then through
               ``StreamingSession`` (what an app calls): decode = greedy steps with the
               state fed back, best of ``--reps`` x ``--tokens``; prefill = one prompt
               of each ``--prompts`` length from a fresh state, best of ``--reps``
    llama.cpp  ``llama-bench -t T -p P1,P2,.. -n TOKENS -r REPS`` (its mean tok/s)
    roofline   what decode would reach if a step only streamed its bytes through memory
               at the bandwidth measured here (a 2-thread read of 1 GiB): the step graph's
               weights once (a tied table counted once) plus the state read and written
    size       the bundle directory (graphs, weights, tokenizer, manifest) / the GGUF file

The two take turns per precision, so a disturbance hits both; run it with nothing else on
the machine. Prints a table and writes JSON (``--out``).

    python scripts/bench_peer_cpu.py [--anchor /tmp/anchor] [--llama-bench /tmp/lcpp/llama-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PRECISIONS = {"fp32": "f32", "int8": "Q8_0", "int4": "Q4_0"}  # edgeseq -> the GGUF file's tag
MiB = 2**20


def bandwidth_gbs(threads: int, gib: int = 1, reps: int = 5) -> float:
    """Read bandwidth (GB/s): the best of ``reps`` sums over ``gib`` GiB with torch's threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(gib * 2**30 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def export(checkpoint: Path, out: Path, precision: str, flavor: str | None, block: int) -> None:
    if (out / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "edgeseq.cli", "export", "--model", str(checkpoint), "--target", "x86", "--width", "1",
           "--quant", precision, "--int4-block-size", str(block), "--no-validate", "-o", str(out)]  # fmt: skip
    subprocess.run(cmd + (["--flavor", flavor] if flavor else []), check=True, stdout=subprocess.DEVNULL)


def step_bytes(bundle: Path, flavor: str) -> tuple[int, int]:
    """(weight bytes the step graph reads per token, state bytes read + written per token)."""
    import onnx

    from edgeseq.deploy.bundle import graph_path, read_manifest

    manifest = read_manifest(bundle)
    proto = onnx.load(graph_path(bundle, manifest, flavor, "step"), load_external_data=False)
    seen, weights = set(), 0
    for t in proto.graph.initializer:
        where = {e.key: e.value for e in t.external_data}
        key = (where.get("location"), where.get("offset")) if where else t.name
        if key in seen:
            continue
        seen.add(key)
        weights += int(where["length"]) if where else len(t.raw_data)
    state = 0
    for spec in manifest["io"]["step"]["inputs"]:
        if spec["name"].startswith("past."):
            state += int(np.prod([1 if isinstance(d, str) else d for d in spec["shape"]])) * 4
    return weights, 2 * state


def edgeseq_speed(bundle: Path, flavor: str | None, threads: int, tokens: int, prompts: list[int], reps: int) -> dict:
    from edgeseq.runtimes.session import StreamingSession

    rng = np.random.default_rng(0)
    with StreamingSession.from_bundle(bundle, flavor=flavor, threads=threads) as session:
        vocab = session.vocab_size
        prefill: dict[int, list[float]] = {n: [] for n in prompts}
        decode = []
        for _ in range(reps):
            for n in prompts:
                ids = rng.integers(0, vocab, n)
                session.reset()
                t0 = time.perf_counter()
                logits = session.prefill(ids)
                prefill[n].append(n / (time.perf_counter() - t0))
            token = int(np.argmax(logits))
            t0 = time.perf_counter()
            for _ in range(tokens):
                token = int(np.argmax(session.step(token)))
            decode.append(tokens / (time.perf_counter() - t0))
        used = session.flavor
    return {"decode_tok_s": max(decode), "prefill_tok_s": {n: max(v) for n, v in prefill.items()}, "flavor": used,
            "decode_all": decode, "prefill_all": prefill}  # fmt: skip


def llama_speed(llama_bench: Path, gguf: Path, threads: int, tokens: int, prompts: list[int], reps: int) -> dict:
    cmd = [str(llama_bench), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, prompts)), "-n", str(tokens),
           "-r", str(reps), "-o", "json"]  # fmt: skip
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    decode = next(r for r in rows if r["n_gen"] > 0)
    prefill = {r["n_prompt"]: r for r in rows if r["n_prompt"] > 0}
    return {"decode_tok_s": decode["avg_ts"], "prefill_tok_s": {n: prefill[n]["avg_ts"] for n in prompts},
            "decode_sd": decode["stddev_ts"], "prefill_sd": {n: prefill[n]["stddev_ts"] for n in prompts}}  # fmt: skip


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchor", type=Path, default=Path("/tmp/anchor"), help="the peer build's model folder")
    ap.add_argument("--llama-bench", type=Path, default=Path("/tmp/lcpp/llama-bench"))
    ap.add_argument("--bundles", type=Path, default=Path("/tmp/bench_peer_cpu"), help="where the exports go (reused)")
    ap.add_argument("--flavor", default=None, help="graph flavor (default: the x86 target's first)")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--int4-block-size", type=int, default=32, help="weights per int4 scale (the export default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512, help="the prompt length of the main table")
    ap.add_argument("--prompts", default="64,512,4096", help="prompt lengths of the prefill table")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-llama", action="store_true", help="edgeseq only (quick checks)")
    ap.add_argument("--out", type=Path, default=Path("scripts/results/bench_peer_cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # llama.cpp's OpenMP, torch's bandwidth probe

    from rich.console import Console
    from rich.table import Table

    checkpoint = args.anchor / "mamba2-130m"
    bw = bandwidth_gbs(args.threads)
    prompts = sorted({args.prompt, *map(int, args.prompts.split(","))})
    rows = []
    for precision in args.precisions.split(","):
        block = f"-b{args.int4_block_size}" if precision == "int4" else ""
        bundle = args.bundles / f"{precision}{block}-{args.flavor or 'default'}"
        export(checkpoint, bundle, precision, args.flavor, args.int4_block_size)
        gguf = args.anchor / f"mamba2-130m-{PRECISIONS[precision]}.gguf"
        ours = edgeseq_speed(bundle, args.flavor, args.threads, args.tokens, prompts, args.reps)
        peer = None if args.skip_llama else llama_speed(args.llama_bench, gguf, args.threads, args.tokens, prompts,
                                                        args.reps)  # fmt: skip
        weights, state = step_bytes(bundle, ours["flavor"])
        roofline = bw * 1e9 / (weights + state)
        rows.append({
            "precision": precision, "gguf": gguf.name, "edgeseq": ours, "llama_cpp": peer,
            "decode_ratio": peer and ours["decode_tok_s"] / peer["decode_tok_s"],
            "prefill_ratio": peer and ours["prefill_tok_s"][args.prompt] / peer["prefill_tok_s"][args.prompt],
            "prefill_ratios": {n: peer and ours["prefill_tok_s"][n] / peer["prefill_tok_s"][n] for n in prompts},
            "step_weight_bytes": weights, "step_state_bytes": state, "roofline_tok_s": roofline,
            "decode_vs_roofline": ours["decode_tok_s"] / roofline,
            "bundle_bytes": dir_bytes(bundle), "gguf_bytes": gguf.stat().st_size,
            "size_ratio": dir_bytes(bundle) / gguf.stat().st_size,
        })  # fmt: skip

    title = f"edgeseq vs llama.cpp, Mamba2 130M, {args.threads} threads, batch 1 (read bandwidth {bw:.1f} GB/s)"
    table = Table(title=title)
    for col in ("precision", "decode edgeseq", "decode llama.cpp", "×", "roofline", "of roofline",
                f"prefill-{args.prompt} edgeseq", f"prefill-{args.prompt} llama.cpp", "×", "bundle / GGUF MiB"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        e, p = r["edgeseq"], r["llama_cpp"] or {}
        table.add_row(
            f"{r['precision']} / {PRECISIONS[r['precision']]}", f"{e['decode_tok_s']:.1f}",
            f"{p.get('decode_tok_s', float('nan')):.1f}", f"{r['decode_ratio'] or float('nan'):.2f}",
            f"{r['roofline_tok_s']:.0f}", f"{r['decode_vs_roofline']:.2f}", f"{e['prefill_tok_s'][args.prompt]:.0f}",
            f"{p.get('prefill_tok_s', {}).get(args.prompt, float('nan')):.0f}", f"{r['prefill_ratio'] or float('nan'):.2f}",
            f"{r['bundle_bytes'] / MiB:.1f} / {r['gguf_bytes'] / MiB:.1f} ({r['size_ratio']:.2f}×)",
        )  # fmt: skip
    Console(width=200).print(table)
    sweep = Table(title="prefill tok/s by prompt length: edgeseq / llama.cpp (×)")
    sweep.add_column("precision")
    for n in prompts:
        sweep.add_column(f"{n} tokens", justify="right")
    for r in rows:
        e, p = r["edgeseq"]["prefill_tok_s"], (r["llama_cpp"] or {}).get("prefill_tok_s", {})
        sweep.add_row(r["precision"], *(f"{e[n]:.0f} / {p.get(n, float('nan')):.0f} ({r['prefill_ratios'][n] or float('nan'):.2f}×)"
                                        for n in prompts))  # fmt: skip
    Console(width=200).print(sweep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    build = args.llama_bench.parent / "BUILD_INFO.txt"
    args.out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                    "read_bandwidth_gbs": bw},
        "llama_cpp_build": build.read_text() if build.is_file() else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }, indent=1) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
