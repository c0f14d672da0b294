"""`edgeseq plan`'s peak memory against `edgeseq bench`'s measured peak RSS, per bundle.

    python scripts/plan_vs_bench.py [BUNDLE ...] [--work DIR] [--out scripts/results/plan_vs_bench.json]

Without BUNDLE arguments the shipped models (mamba2-tiny, hybrid-tiny) are exported
without validation into --work: the x86-64-cpu target (fp32, its default) at widths 1,
1/2 and 1/4, int8, fp16 and int4 at some of them, and the raspberry-pi-5 target's own
choice (its default, int8). An existing bundle there is reused.

Each bundle runs as `edgeseq bench` runs it (``edgeseq.deploy.bench._bench_one``: a
StreamingSession over the step and prefill graphs of the first flavor that runs here,
a ``PREFILL_TOKENS``-token prompt, then decode steps) in a fresh Python process in which
importing torch is refused, so the measured peak RSS (ru_maxrss) is the runtime's alone.
Plan's prediction is ``targets.plan.plan(...)``'s ``peak_bytes`` for the bundle's model,
width, precision and target, from the model's config alone. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edgeseq.deploy.bundle import read_manifest
from edgeseq.targets import get_target
from edgeseq.targets.plan import PREFILL_TOKENS, plan
from edgeseq.zoo import load_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50  # decode steps after the prompt: the state is fed back, nothing grows
DEFAULT_BUNDLES = [  # (model, target, width or None: the target's choice, precision or None: the target's)
    *[(m, "x86-64-cpu", w, "fp32") for m in ("mamba2-tiny", "hybrid-tiny") for w in ("1", "0.5", "0.25")],
    *[(m, "x86-64-cpu", w, "int8") for m in ("mamba2-tiny", "hybrid-tiny") for w in ("1", "0.25")],
    *[(m, "x86-64-cpu", "0.5", p) for m in ("mamba2-tiny", "hybrid-tiny") for p in ("fp16", "int4")],
    *[(m, "raspberry-pi-5", None, None) for m in ("mamba2-tiny", "hybrid-tiny")],
]

# The child: torch refused before anything is imported, then the bench's own function. Its
# peak is read from /proc's VmHWM: Linux's ru_maxrss of a process started by fork and exec
# carries its parent's peak over (this script's, with torch, ~400 MiB).
CHILD = """
import json, sys
class RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is refused in this measurement")
sys.meta_path.insert(0, RefuseTorch())
from edgeseq.deploy.bench import _bench_one
row = _bench_one(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
row["torch_loaded"] = "torch" in sys.modules
row["vm_hwm_bytes"] = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(row))
"""


def measured_peak(
    bundle: Path, flavor: str, steps: int = STEPS, prompt: int = PREFILL_TOKENS, threads: int = 2
) -> dict:
    """``edgeseq bench``'s row for one onnxruntime flavor, run in a torch-free process."""
    args = [str(bundle), f"onnxruntime:{flavor}", str(steps), str(prompt), str(threads)]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bench of {bundle} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_peak(bundle: Path) -> dict:
    """Plan's row for the bundle's model, width, precision and target."""
    manifest = read_manifest(bundle, verify=False)
    model, _ = load_model(manifest["model_name"])
    target = get_target(manifest["target"]["name"])
    (row,) = [r for r in plan(model.config, target, widths=[manifest["width"]]) if r.precision == manifest["precision"]]
    return {"model": manifest["model_name"], "target": target.name, "width": manifest["width"],
            "precision": manifest["precision"], "flavor": manifest["flavors"][0], "plan_peak_bytes": row.peak_bytes}  # fmt: skip


def export(work: Path, model: str, target: str, width: str | None, precision: str | None) -> Path:
    name = f"{model}-{target}-w{(width or 'auto').replace('/', '_')}-{precision or 'default'}"
    out = work / name
    if not (out / "manifest.json").is_file():
        args = ["export", "--model", model, "--target", target, "--no-validate", "-o", str(out), "--overwrite"]
        args += [*(["--width", width] if width else []), *(["--quant", precision] if precision else [])]
        done = subprocess.run(
            [sys.executable, "-m", "edgeseq.cli", *args], check=False, cwd=ROOT, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"export of {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return out


def compare_bundle(bundle: Path, threads: int) -> dict:
    row = predicted_peak(bundle)
    bench = measured_peak(bundle, row["flavor"], threads=threads)
    if bench["torch_loaded"]:
        raise RuntimeError("torch was imported in the measurement process")
    row |= {"bench_peak_rss_bytes": bench["vm_hwm_bytes"], "bundle": str(bundle)}
    return row | {"ratio": row["plan_peak_bytes"] / row["bench_peak_rss_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/plan_vs_bench"), help="Where default bundles are exported.")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads (edgeseq bench's default).")
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "plan_vs_bench.json")
    args = ap.parse_args()
    bundles = args.bundles or [export(args.work, *spec) for spec in DEFAULT_BUNDLES]
    rows = [compare_bundle(b, args.threads) for b in bundles]
    print(f"{'model':<12} {'target':<15} {'width':>5} {'prec':>5} {'plan MiB':>9} {'bench MiB':>10} {'plan/bench':>10}")
    for r in rows:
        print(f"{r['model']:<12} {r['target']:<15} {r['width']:>5} {r['precision']:>5} "
              f"{r['plan_peak_bytes'] / 2**20:>9.1f} {r['bench_peak_rss_bytes'] / 2**20:>10.1f} {r['ratio']:>10.2f}")  # fmt: skip
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    print(f"worst: {worst['model']} w{worst['width']} {worst['precision']}, plan/bench {worst['ratio']:.2f}")
    doc = {"prompt_tokens": PREFILL_TOKENS, "decode_steps": STEPS, "threads": args.threads, "python": sys.version.split()[0],
           "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
