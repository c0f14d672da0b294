"""Soak test: a long stream of a bundle's step graph in onnxruntime, judged against fp64.

    python3 scripts/soak.py MODEL [--width 0.25] [--steps 1000000] [--block 10000]
        [--bundle DIR] [--threads 1] [--reference-threads 2] [--time-limit S]
        [--checkpoint FILE [--resume]] [--out-dir scripts/results/soak]

The model (a built-in name or a checkpoint) is exported at ``--width`` as an fp32
portable bundle (or ``--bundle`` is taken as it is), its step graph opened the way an app
opens it (``open_runner`` + ``StreamingSession``, one onnxruntime thread) and run for
``--steps`` tokens with the state fed back. The tokens are the shipped held-out sample,
cycled, forced: the stream stays in distribution and the exact model can follow it
cheaply. That fp64 reference is the bundle's own model in float64 on the CPU, run over
the same tokens through its chunked prefill with the state carried across chunks (many
times faster than a million single steps); before it is trusted, it must match the fp64
single-step path on a short stream to ``VERIFY_TOLERANCE``.

    for each block of --block steps (each side carries its own state):
        graph: --block single steps, logits kept      fp64: prefill of the same tokens
        compare the two -> record -> reuse both buffers for the next block

Only one block of logits is held per side (two for fp64, double-buffered), never the
stream's. The fp64 side runs in a child process one block ahead (``ChildReference``), so
that its allocations stay out of the stream's RSS and its time off the stream's clock;
``--inline`` runs it in this process between the graph's blocks instead (then torch's
allocator churn shares the RSS, which is not judged).

Per block: max abs logit distance graph-vs-fp64, max |state|, the state's distance from
fp64, non-finite values, the process's RSS. The first ``--context-steps`` also run the fp32
PyTorch step path (what validation's drift rule calls the reference), to put the distance
in context. Bounds, each a verdict (exit 1 if any fails, with the reason):

    finite      no NaN/Inf in the graph's logits or state, ever
    rss         RSS grows at most --rss-growth-mib after the first --warmup-blocks (per process;
                glibc is asked to keep freed memory, so RSS is the high-water mark)
    distance    the max distance over the whole stream is within the drift rule's limit
                (``export.spec.drift_limit`` of the fp32 reference's distance over the
                context steps) or --max-distance
    trend       the max over the last 10% of blocks is at most --max-trend x the max over
                the first 10%: bounded, not growing
    reference   fp64 chunked prefill == fp64 single steps (``VERIFY_TOLERANCE``)

A run stopped by ``--time-limit`` saves ``--checkpoint`` (both states, the position, the
blocks so far) and writes a partial JSON; ``--resume`` continues it in a new process.
Prints a table and writes ``<out-dir>/<model>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from soak_fp64 import ChildReference, InlineReference, Tokens, fp32_context, verify_reference
from soak_report import Block, load_checkpoint, print_table, save_checkpoint, summarize

from edgeseq.deploy.bundle import graph_file, read_manifest
from edgeseq.deploy.pipeline import ExportRequest, export_bundle
from edgeseq.deploy.runtimes import Placement, open_runner
from edgeseq.deploy.validation import reference_model
from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import DRIFT_RATIO
from edgeseq.runtimes.session import StreamingSession
from edgeseq.width import WidthSpec

FLAVOR = "portable"
MIB = 2**20


# ---- the token stream and the process -------------------------------------------------
def rss_bytes() -> int:
    """This process's resident set size (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory (no trimming; blocks up to 32 MiB from the heap, not
    mmap; one arena), so that RSS is the heap's high-water mark, not what the process
    happened to hold when it is read (onnxruntime's per-step outputs, numpy temporaries,
    with ``--inline`` torch's): a leak still shows as growth, churn no longer as noise.
    False where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's <malloc.h>
    settings = ((m_trim_threshold, 2**31 - 1), (m_mmap_threshold, 32 * MIB), (m_arena_max, 1))
    return all(mallopt(option, value) for option, value in settings)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine()
            )
    except OSError:
        return platform.machine()


# ---- the bundle and the two references ------------------------------------------------
def take_bundle(args) -> tuple[Path, dict]:
    """``--bundle`` as it is, else ``<work>/<model>-w<width>-fp32``: reused when it is a
    bundle of this model and width, else exported (no validation: this run is one)."""
    if args.bundle:
        root = Path(args.bundle)
    else:
        label = str(WidthSpec.parse(args.width)).replace("/", "_")
        root = Path(args.work) / f"{Path(args.model).name}-w{label}-fp32"
        if not _reusable(root, args):
            export_bundle(ExportRequest(args.model, args.target, WidthSpec.parse(args.width), root, flavor=FLAVOR,
                                        precision="fp32", validate=False, overwrite=True))  # fmt: skip
    manifest = read_manifest(root)
    if manifest["precision"] != "fp32" or FLAVOR not in manifest["flavors"]:
        raise EdgeseqError(
            f"{root} holds {manifest['precision']} {manifest['flavors']} graphs; soak an fp32 {FLAVOR} bundle"
        )
    return root, manifest


def _reusable(root: Path, args) -> bool:
    try:
        manifest = read_manifest(root)
    except EdgeseqError:
        return False
    return manifest.get("model_name") == Path(args.model).name and manifest["width"] == str(WidthSpec.parse(args.width))


def open_stream(root: Path, manifest: dict, threads: int) -> StreamingSession:
    """The bundle's step graph in onnxruntime on the CPU, as an app runs it."""
    runner = open_runner(root, manifest, FLAVOR, "step", Placement(("CPUExecutionProvider",), threads))
    runner.activate()
    return StreamingSession(runner)


# ---- one block ------------------------------------------------------------------------
def run_graph(session: StreamingSession, ids: np.ndarray, out: np.ndarray, tick) -> float:
    """Step the graph over ``ids``, logits into ``out`` [n, V]; returns the seconds."""
    t0 = time.perf_counter()
    for t, token in enumerate(ids.tolist()):
        out[t] = session.step(token)
        if t % 500 == 499:
            tick(500)
    tick(ids.size % 500)
    return time.perf_counter() - t0


def distances(graph_logits: np.ndarray, fp64_logits: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """Per step max |graph - fp64| [n], computed in ``diff`` [n, V] float64 (reused)."""
    np.subtract(graph_logits, fp64_logits, out=diff)
    return np.abs(diff, out=diff).max(axis=1)


def state_figures(session: StreamingSession, fp64_state: dict[str, np.ndarray]) -> tuple[float, float, int]:
    """The graph's state now: max |state|, max |state - fp64 state|, non-finite values."""
    state = {k: v for k, v in safetensors.numpy.load(session.save_state()).items() if v.dtype.kind == "f"}
    return (
        max(float(np.abs(v).max()) for v in state.values()),
        max(float(np.abs(v - fp64_state[k]).max()) for k, v in state.items()),
        sum(int(v.size - np.isfinite(v).sum()) for v in state.values()),
    )


# ---- the run --------------------------------------------------------------------------
@dataclass
class Run:
    """What the stream loop needs, set up once per process."""

    session: StreamingSession  # the graph, its state at meta["position"]
    reference: InlineReference | ChildReference  # the fp64 reference, one block ahead at most
    tokens: Tokens
    meta: dict  # what a checkpoint and the JSON carry: bundle, verify, context, blocks


def setup(args, console: Console) -> Run:
    root, manifest = take_bundle(args)
    session = open_stream(root, manifest, args.threads)
    model32, _ = reference_model(root, manifest, "cpu")
    model64 = copy.deepcopy(model32).double().eval()
    tokens, graph_sha = Tokens(), manifest["files"][graph_file(FLAVOR, "step")]
    if args.resume:
        meta, fp64_state = load_checkpoint(Path(args.checkpoint), session, graph_sha)
        meta["segments"] += 1
        console.print(f"resumed at step {meta['position']:,} (segment {meta['segments']})")
    else:
        console.print(f"bundle {root}: verifying the fp64 reference on {args.verify_steps} steps ...")
        verify = verify_reference(model64, tokens.at(0, args.verify_steps), args.chunk)
        n = min(args.context_steps, args.block, args.steps)
        context = fp32_context(model32, model64, tokens.at(0, n), args.chunk)
        meta = {"model": args.model, "bundle": str(root), "width": manifest["width"], "graph_sha256": graph_sha,
                "verify": verify, "position": 0, "segments": 0,
                "context": {"steps": n, "fp32_reference_max": float(context.max())}, "blocks": [], "wall_s": 0.0}  # fmt: skip
        fp64_state = None
    if args.inline:
        reference = InlineReference(model64, args.block, args.chunk, fp64_state)
    else:
        span = (meta["position"], args.steps)
        reference = ChildReference(root, args.block, args.chunk, args.reference_threads, span, fp64_state)
    return Run(session, reference, tokens, meta)


def stream(run: Run, args, console: Console) -> bool:
    """Run blocks until ``--steps`` or ``--time-limit``; True when the stream is complete."""
    meta, t_start = run.meta, time.monotonic()
    vocab = run.session.io.outputs[0].shape[-1]
    logits, diff = np.empty((args.block, vocab), np.float32), np.empty((args.block, vocab), np.float64)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, speed_estimate_period=120) as progress:
        task = progress.add_task(meta["model"], total=args.steps, completed=meta["position"], info="")
        while meta["position"] < args.steps:
            block = one_block(run, logits, diff, lambda n: progress.advance(task, n), args)
            meta["blocks"].append(block.__dict__)
            meta["position"] += block.steps
            meta["wall_s"] += block.wall_s
            line = f"step {meta['position']:,}: |graph - fp64| {block.max_abs:.3g}, RSS {block.rss_mib:.1f} MiB"
            progress.update(task, info=f"{block.steps / block.wall_s:,.0f} steps/s, {line}")
            done = meta["position"] >= args.steps
            if block.index % args.log_every == 0 or done:
                progress.console.print(f"block {block.index}, {line}, non-finite {block.nonfinite}")
            out_of_time = args.time_limit and time.monotonic() - t_start + block.wall_s > args.time_limit
            if args.checkpoint and (out_of_time or done or block.index % args.checkpoint_every == 0):
                save_checkpoint(Path(args.checkpoint), run.session, run.reference.named_state(), meta)
            if out_of_time and not done:
                console.print(f"time limit: stopped at step {meta['position']:,}; resume with --resume")
                return False
    return True


def one_block(run: Run, logits: np.ndarray, diff: np.ndarray, tick, args) -> Block:
    """The graph, then the fp64 reference, over the next block of tokens; compared."""
    start, meta, t0 = run.meta["position"], run.meta, time.perf_counter()
    n = min(args.block, args.steps - start)
    ids = run.tokens.at(start, n)
    graph_s = run_graph(run.session, ids, logits[:n], tick)
    fp64_logits, fp64_s, wait_s = run.reference.block(start, n)
    per_step = distances(logits[:n], fp64_logits, diff[:n])
    max_state, state_vs_fp64, nonfinite = state_figures(run.session, run.reference.named_state())
    nonfinite += int(logits[:n].size - np.isfinite(logits[:n]).sum())
    if start == 0:
        meta["context"]["graph_max"] = float(per_step[: meta["context"]["steps"]].max())
    return Block(
        len(meta["blocks"]), start, n, float(per_step.max()), float(per_step.mean()), start + int(np.argmax(per_step)),
        max_state, state_vs_fp64, nonfinite, rss_bytes() / MIB, graph_s, fp64_s, wait_s, time.perf_counter() - t0,
        meta["segments"],
    )  # fmt: skip


def result_json(run: Run, args, complete: bool) -> dict:
    import onnxruntime

    meta = run.meta
    blocks = [Block(**b) for b in meta["blocks"]]
    return {
        "model": meta["model"], "width": meta["width"], "bundle": meta["bundle"], "flavor": FLAVOR, "precision": "fp32",
        "complete": complete, "args": vars(args), "cpu": cpu_name(), "cores": os.cpu_count(),
        "onnxruntime": f"onnxruntime {onnxruntime.__version__}", "torch": torch.__version__,
        "python": platform.python_version(), "wall_s": meta["wall_s"], "segments": meta["segments"] + 1,
        "verify": meta["verify"], "context": meta["context"],
        "summary": summarize(blocks, meta["context"], meta["verify"], args), "blocks": meta["blocks"],
    }  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", help="built-in model name (mamba2-tiny, hybrid-tiny) or checkpoint directory")
    ap.add_argument("--width", default="0.25")
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--block", type=int, default=10_000, help="steps per compared block")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per fp64 prefill call")
    ap.add_argument("--bundle", help="an fp32 bundle to take as it is (default: export one under --work)")
    ap.add_argument("--work", default="/tmp/edgeseq-soak", help="where bundles are exported")
    ap.add_argument("--target", default="x86-64-cpu")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--reference-threads", type=int, default=2, help="torch threads of the fp64 reference")
    ap.add_argument(
        "--inline",
        action="store_true",
        help="the fp64 reference in this process, between blocks (slower; RSS then not judged)",
    )
    ap.add_argument("--verify-steps", type=int, default=2000, help="fp64 chunked vs single steps on this many")
    ap.add_argument("--context-steps", type=int, default=4096, help="fp32 torch step path on this many")
    ap.add_argument("--rss-growth-mib", type=float, default=2.0, help="bound on RSS growth after the warm-up")
    ap.add_argument("--warmup-blocks", type=int, default=1, help="blocks before RSS is held flat")
    ap.add_argument("--max-trend", type=float, default=DRIFT_RATIO, help="last 10%% vs first 10%% of blocks")
    ap.add_argument("--max-distance", type=float, help="bound on max |graph - fp64| (default: the drift rule's limit)")
    ap.add_argument("--time-limit", type=float, help="stop after about this many seconds of streaming")
    ap.add_argument(
        "--checkpoint", help="state + position file, saved every --checkpoint-every blocks and at the time limit"
    )
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    ap.add_argument("--log-every", type=int, default=10, help="print a line every this many blocks")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results" / "soak"))
    args = ap.parse_args(argv)
    if args.resume and not args.checkpoint:
        ap.error("--resume needs --checkpoint FILE")
    if (
        min(args.steps, args.block, args.chunk, args.verify_steps, args.context_steps, args.threads, args.warmup_blocks)
        < 1
    ):
        ap.error("--steps, --block, --chunk, --verify-steps, --context-steps, --threads, --warmup-blocks: at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)  # logs: wide enough for the table
    torch.set_num_threads(args.reference_threads)
    kept = keep_freed_memory()
    try:
        run = setup(args, console)
        try:
            complete = stream(run, args, console)
        finally:
            run.reference.close()
    except EdgeseqError as error:
        console.print(f"error: {error}", highlight=False)
        return error.exit_code
    result = result_json(run, args, complete) | {"malloc_keeps_freed": kept}
    out = Path(args.out_dir) / f"{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(console, result)
    console.print(f"wrote {out}" + ("" if complete else " (partial: the stream did not finish)"))
    failed = [f"{name}: {why}" for name, (ok, why) in result["summary"]["verdicts"].items() if ok is False]
    for reason in failed:
        console.print(f"[red]FAIL[/red] {reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
