"""What a mid-stream width switch costs, on the held-out sample, for the shipped models.

For each shipped model's elastic bundle (exported here when missing), each held-out window
is prefilled for ``--before`` tokens at one width, the stream switches, and the next
``--after`` tokens are scored (bits per byte: the models read bytes). Each switch is set
beside the stream that stayed at the old width and the one that ran at the new width from
the start, on the same windows:

    wide -> narrow     the state keeps the narrower width's heads
    narrow -> wide     zeros for the new heads, or a replay of the last 64-127 tokens

Switch latency is the wall time of ``set_width``, given as a ratio to one decode step at
the new width measured in the same run (absolute CPU times are this machine's only).
Prints a table, writes JSON and a plot of the excess bits after a switch.

    python scripts/elastic_switch_cost.py --out docs/elastic_switch_cost.json --plot docs/elastic_switch_cost.png
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgeseq.runtimes.session import StreamingSession
from edgeseq.validate.heldout import heldout_windows

LN2 = math.log(2)


def ensure_bundle(model: str, root: Path) -> Path:
    path = root / model
    if not (path / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "edgeseq.cli", "export", "--model", model, "--target", "x86", "--elastic",
                        "-o", str(path), "--overwrite"], check=True)  # fmt: skip
    return path


def nll_bits(logits: np.ndarray, target: int) -> float:
    z = logits.astype(np.float64)
    z = z - z.max()
    return float((math.log(np.exp(z).sum()) - z[target]) / LN2)


def stream(session: StreamingSession, ids: np.ndarray, before: int, start: str, then: str | None, policy: str):
    """Bits of each of the ``after`` targets past the switch, switch seconds, step seconds."""
    session.set_width(start)
    session.reset()
    session.prefill(ids[:before])
    switch_s = 0.0
    if then is not None:
        t = time.perf_counter()
        session.set_width(then, policy)
        switch_s = time.perf_counter() - t
    bits, step_s = [], []
    for k in range(before, len(ids) - 1):
        t = time.perf_counter()
        logits = session.step(int(ids[k]))
        step_s.append(time.perf_counter() - t)
        bits.append(nll_bits(logits, int(ids[k + 1])))
    return np.asarray(bits), switch_s, float(np.median(step_s))


def measure(bundle: Path, streams: int, before: int, after: int, replay: int) -> dict:
    windows = heldout_windows(streams, before + after, seed=1)
    with StreamingSession.from_bundle(bundle, threads=2) as session:
        session.widths.replay = replay
        widths = session.widths.labels
        wide = widths[0]
        runs = {}  # (start, then, policy) -> per-window bits, switch and step seconds

        def run(start, then=None, policy="zeros"):
            key = (start, then, policy)
            if key not in runs:
                out = [stream(session, w, before, start, then, policy) for w in windows]
                runs[key] = (np.stack([o[0] for o in out]), [o[1] for o in out], [o[2] for o in out])
            return runs[key]

        rows = []
        for other in widths[1:]:
            for old, new, policies in [(wide, other, ["keep"]), (other, wide, ["zeros", "replay"])]:
                stayed, started = run(old)[0], run(new)[0]
                for policy in policies:
                    bits, switch_s, _ = run(old, new, "zeros" if policy == "keep" else policy)
                    step_new = float(np.median(run(new)[2]))
                    rows.append({
                        "from": old, "to": new, "policy": policy,
                        "bpb_switched": float(bits.mean()), "bpb_stayed": float(stayed.mean()),
                        "bpb_new_from_start": float(started.mean()),
                        "excess_first_64": float((bits[:, :64] - started[:, :64]).mean()),
                        "switch_ms": 1e3 * float(np.median(switch_s)), "step_ms": 1e3 * step_new,
                        "switch_steps": float(np.median(switch_s)) / step_new,
                        "curve": np.round((bits - started).mean(0), 4).tolist(),
                    })  # fmt: skip
    return {"widths": widths, "rows": rows}


def table(model: str, result: dict) -> str:
    header = (f"{'switch':>16} {'policy':>7} {'switched':>9} {'stayed':>7} {'new':>7} {'first 64':>9} "
              f"{'latency (steps)':>16}")  # fmt: skip
    lines = [f"{model}: bits per byte over the {len(result['rows'][0]['curve'])} tokens after the switch", header]
    for r in result["rows"]:
        lines.append(f"{r['from'] + ' -> ' + r['to']:>16} {r['policy']:>7} {r['bpb_switched']:9.4f} "
                     f"{r['bpb_stayed']:7.4f} {r['bpb_new_from_start']:7.4f} {r['excess_first_64']:+9.4f} "
                     f"{r['switch_steps']:16.2f}")  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (model, result) in zip(axes[0], results.items()):
        wide, thin = result["widths"][0], result["widths"][-1]
        for r in result["rows"]:
            if {r["from"], r["to"]} != {wide, thin}:
                continue
            curve = np.asarray(r["curve"])
            smooth = np.convolve(curve, np.ones(16) / 16, mode="valid")
            ax.plot(np.arange(len(smooth)) + 8, smooth, label=f"{r['from']} -> {r['to']} ({r['policy']})")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{model}: after a switch, vs the new width from the start")
        ax.set_xlabel("tokens after the switch")
        ax.set_ylabel("excess bits per byte (16-token mean)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mamba2-tiny,hybrid-tiny")
    parser.add_argument("--bundles", type=Path, default=Path("out/elastic"))
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--before", type=int, default=512)
    parser.add_argument("--after", type=int, default=512)
    parser.add_argument("--replay", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    results = {}
    for model in args.models.split(","):
        bundle = ensure_bundle(model, args.bundles)
        results[model] = measure(bundle, args.streams, args.before, args.after, args.replay)
        print(table(model, results[model]), flush=True)
    settings = {k: getattr(args, k) for k in ("streams", "before", "after", "replay")}
    if args.out:
        args.out.write_text(json.dumps({"settings": settings, "models": results}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
