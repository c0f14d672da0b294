"""onnxruntime-genai against edgeseq's StreamingSession on the same bundle, and the decoder
form onnxruntime-genai runs (``edgeseq.export.genai``) against the alternative of running
the prefill graph for every call:

    session       StreamingSession: the step graph per token, the prefill graph per prompt
    genai (If)    onnxruntime-genai, decoder = If(S == 1, step, prefill)   (what bundles ship)
    genai (prefill only)  onnxruntime-genai, decoder = the prefill graph for prompts and tokens

Per row: prefill of a ``--prompt``-token prompt (ms, median of ``--repeats``) and decode
(ms per token, median over ``--tokens`` greedy tokens after it), one onnxruntime thread;
the three runtimes take turns for ``--rounds`` rounds and each keeps its best round.
Run it with nothing else on the machine; ratios are within one run.

    python scripts/bench_genai.py [--out scripts/results/bench_genai.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
from rich.console import Console
from rich.table import Table

from edgeseq.deploy.bundle import graph_path, read_manifest, write_manifest
from edgeseq.deploy.pipeline import ExportRequest, export_bundle
from edgeseq.export.genai import decoder_graph
from edgeseq.runtimes.session import StreamingSession
from edgeseq.width import WidthSpec


def with_threads(bundle: Path, threads: int) -> None:
    path = bundle / "genai_config.json"
    doc = json.loads(path.read_text())
    doc["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    doc["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    path.write_text(json.dumps(doc))
    resign(bundle)


def resign(bundle: Path) -> None:
    manifest = read_manifest(bundle, verify=False)
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})


def prefill_only_variant(bundle: Path, out: Path) -> Path:
    """The bundle with its decoder replaced by If(S == 1, prefill, prefill)."""
    shutil.copytree(bundle, out)
    manifest = read_manifest(out)
    prefill = onnx.load(str(graph_path(out, manifest, "portable", "prefill")))
    decoder = decoder_graph(prefill, prefill)
    onnx.save(decoder, str(out / manifest["genai"]["decoder"]), save_as_external_data=True,
              location="prefill_only.data", size_threshold=1024)  # fmt: skip
    resign(out)
    return out


def time_session(bundle: Path, prompt: list[int], tokens: int, repeats: int) -> tuple[float, float]:
    with StreamingSession.from_bundle(bundle, threads=1) as s:
        pre = []
        for _ in range(repeats):
            s.reset()
            t0 = time.perf_counter()
            logits = s.prefill(prompt)
            pre.append(time.perf_counter() - t0)
        steps = []
        for _ in range(tokens):
            t0 = time.perf_counter()
            logits = s.step(int(np.argmax(logits)))
            steps.append(time.perf_counter() - t0)
    return statistics.median(pre) * 1e3, statistics.median(steps) * 1e3


def time_genai(bundle: Path, prompt: list[int], tokens: int, repeats: int) -> tuple[float, float]:
    model = og.Model(str(bundle))
    pre, steps = [], []
    for r in range(repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + tokens + 1)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        pre.append(time.perf_counter() - t0)
        if r == repeats - 1:
            generator.generate_next_token()  # samples from the prompt's logits: no model run
            for _ in range(tokens):
                t0 = time.perf_counter()
                generator.generate_next_token()  # runs the model on the previous token, then picks
                steps.append(time.perf_counter() - t0)
    return statistics.median(pre) * 1e3, statistics.median(steps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("scripts/results/bench_genai.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompt = [256, *rng.integers(0, 256, args.prompt - 1).tolist()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("mamba2-tiny", "hybrid-tiny"):
            for width in ("1", "1/2"):
                bundle = Path(tmp) / f"{model}-{width.replace('/', '_')}"
                export_bundle(ExportRequest(model, "x86-64-cpu", WidthSpec.parse(width), bundle, flavor="portable",
                                            precision="fp32", validate=False))  # fmt: skip
                with_threads(bundle, 1)
                variant = prefill_only_variant(bundle, Path(tmp) / f"{bundle.name}-prefill-only")
                runs = (("session", time_session, bundle), ("genai (If)", time_genai, bundle),
                        ("genai (prefill only)", time_genai, variant))  # fmt: skip
                best: dict[str, tuple[float, float]] = {}
                for _ in range(args.rounds):  # runtimes interleaved, the best round of each kept
                    for name, fn, path in runs:
                        pre, step = fn(path, prompt, args.tokens, args.repeats)
                        old = best.get(name, (pre, step))
                        best[name] = (min(old[0], pre), min(old[1], step))
                for name, (pre, step) in best.items():
                    rows.append({"model": model, "width": width, "runtime": name, "prefill_ms": pre, "decode_ms": step})
                    print(f"{model} w{width} {name}: prefill {pre:.2f} ms, decode {step:.3f} ms/token", flush=True)
    table = Table(title=f"prefill of {args.prompt} tokens and decode, 1 thread, fp32 portable")
    for col in ("model", "width", "runtime", "prefill ms", "decode ms/token", "decode vs session"):
        table.add_column(col)
    base = {(r["model"], r["width"]): r["decode_ms"] for r in rows if r["runtime"] == "session"}
    for r in rows:
        table.add_row(r["model"], r["width"], r["runtime"], f"{r['prefill_ms']:.2f}", f"{r['decode_ms']:.3f}",
                      f"{r['decode_ms'] / base[(r['model'], r['width'])]:.2f}x")  # fmt: skip
    Console(width=140).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompt": args.prompt, "tokens": args.tokens, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
