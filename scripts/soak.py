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
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgeseq.data import load_sample
from edgeseq.deploy.bundle import read_manifest
from edgeseq.deploy.pipeline import ExportRequest, export_bundle
from edgeseq.deploy.runtimes import Placement, open_runner
from edgeseq.deploy.validation import reference_model
from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import DRIFT_RATIO, drift_limit
from edgeseq.runtimes.session import StreamingSession
from edgeseq.state import ModelState
from edgeseq.width import WidthSpec

FLAVOR = "portable"
VERIFY_TOLERANCE = 1e-10  # fp64 chunked vs single-step: fp64 rounding only (seen ~1e-13)
MIB = 2**20


# ---- the token stream and the process -------------------------------------------------
class Tokens:
    """The shipped held-out sample, cycled: token t of the stream is sample[t % len]."""

    def __init__(self):
        self.sample = load_sample()

    def at(self, start: int, n: int) -> np.ndarray:
        """[n] int64, the stream's tokens start .. start+n-1."""
        return self.sample[np.arange(start, start + n) % self.sample.size]


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


@torch.no_grad()
def prefill(model, ids: np.ndarray, state: ModelState | None, chunk: int, out: np.ndarray | None = None):
    """Every position's logits [n, V] over ``ids`` [n], chunk by chunk, carrying ``state``
    (None: zeros); written into ``out`` when given. Returns (logits, state)."""
    out = np.empty((ids.size, model.config.vocab_size), np.float64) if out is None else out
    for i in range(0, ids.size, chunk):
        logits, state = model(torch.from_numpy(ids[i : i + chunk])[None], state)
        out[i : i + chunk] = logits[0].numpy()
    return out, state


@torch.no_grad()
def single_steps(model, ids: np.ndarray) -> np.ndarray:
    """[n, V] logits of the model's step path over ``ids`` from a zero state."""
    state, out = model.init_state(1), []
    for token in torch.from_numpy(ids):
        logits, state = model.step(token[None], state)
        out.append(logits[0].numpy())
    return np.stack(out)


def verify_reference(model64, ids: np.ndarray, chunk: int) -> dict:
    """fp64 chunked prefill against fp64 single steps on ``ids``, at the run's chunk and at
    a quarter of the stream (so that several chunk boundaries are crossed)."""
    stepped = single_steps(model64, ids)
    chunks = sorted({chunk, max(1, ids.size // 4)})
    diff = max(float(np.abs(prefill(model64, ids, None, c)[0] - stepped).max()) for c in chunks)
    return {"steps": int(ids.size), "chunks": chunks, "max_abs": diff, "tolerance": VERIFY_TOLERANCE}


def fp32_context(model32, model64, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Per step, max |fp32 reference - fp64| over ``ids``: the fp32 PyTorch step path (the
    reference of validation's drift rule) against the fp64 model."""
    return np.abs(single_steps(model32, ids) - prefill(model64, ids, None, chunk)[0]).max(axis=1)


def named_state(state: ModelState) -> dict[str, np.ndarray]:
    """fp64 state under the graph's input names (``past.{i}.x``, ``position``), copied."""
    return {
        (k if k == "position" else f"past.{k}"): np.ascontiguousarray(v.numpy()) for k, v in state.to_named().items()
    }


def model_state(model, named: dict[str, np.ndarray] | None) -> ModelState | None:
    """``named_state``'s arrays back as the model's state (None stays None: zeros)."""
    if named is None:
        return None
    return ModelState.from_named(model.config, {k.removeprefix("past."): torch.from_numpy(v) for k, v in named.items()})


class Fp64Stream:
    """The fp64 reference following the stream block by block with its own state."""

    def __init__(self, model64, chunk: int, state: ModelState | None = None):
        self.model64, self.chunk, self.state, self.tokens = model64, chunk, state, Tokens()

    def run(self, start: int, out: np.ndarray) -> float:
        """Logits of stream positions start .. start+len(out)-1 into ``out`` [n, V]; seconds."""
        t0 = time.perf_counter()
        _, self.state = prefill(self.model64, self.tokens.at(start, len(out)), self.state, self.chunk, out)
        return time.perf_counter() - t0

    def named_state(self) -> dict[str, np.ndarray]:
        return named_state(self.state)


class InlineReference:
    """``--inline``: the fp64 reference in this process, after each block of the graph.
    Its allocations then share the process (and its RSS) with the graph's."""

    def __init__(self, model64, block: int, chunk: int, state: dict | None):
        self.fp64 = Fp64Stream(model64, chunk, model_state(model64, state))
        self.buffer = np.empty((block, model64.config.vocab_size), np.float64)

    def block(self, start: int, n: int) -> tuple[np.ndarray, float, float]:
        """fp64 logits [n, V] from ``start`` (valid until the next call), seconds, seconds waited."""
        seconds = self.fp64.run(start, self.buffer[:n])
        return self.buffer[:n], seconds, seconds

    def named_state(self) -> dict[str, np.ndarray]:
        return self.fp64.named_state()

    def close(self) -> None:
        pass


class ChildReference:
    """The fp64 reference in a child process, one block ahead of the graph (the default).

        stream:  graph block k   | compare k (buffer k%2) | graph block k+1 | compare k+1
        child:   fp64 block k -> buffer k%2 | fp64 block k+1 -> buffer (k+1)%2  |  ...

    Two shared buffers: the child fills one while the stream compares the other. The
    reference's allocations stay out of the stream's RSS and its time mostly off the
    stream's wall clock."""

    def __init__(self, root: Path, block: int, chunk: int, threads: int, span: tuple[int, int], state: dict | None):
        ctx = mp.get_context("spawn")  # no fork of a process that runs onnxruntime's and torch's threads
        vocab = read_manifest(root)["config"]["vocab_size"]
        shared = [ctx.RawArray("d", block * vocab) for _ in range(2)]
        self.buffers = [np.frombuffer(raw, np.float64).reshape(block, vocab) for raw in shared]
        self.conn, theirs = ctx.Pipe()
        args = (theirs, shared, str(root), block, chunk, threads, state)
        self.process = ctx.Process(target=serve_fp64, args=args, daemon=True, name="soak-fp64")
        self.process.start()
        self.block_size, self.end, self.slot, self.state = block, span[1], 0, state
        self._ask(span[0])

    def _ask(self, start: int) -> None:
        if start < self.end:
            self.conn.send((start, min(self.block_size, self.end - start), self.slot))

    def block(self, start: int, n: int) -> tuple[np.ndarray, float, float]:
        """fp64 logits [n, V] from ``start`` (valid until the next call), seconds, seconds waited."""
        t0 = time.perf_counter()
        try:
            reply = self.conn.recv()
        except EOFError:
            raise RuntimeError("the fp64 reference process ended unexpectedly") from None
        if reply[0] == "error":
            raise RuntimeError(f"the fp64 reference process failed:\n{reply[1]}")
        _, done, seconds, self.state = reply
        if done != start:
            raise RuntimeError(f"the fp64 reference sent block {done}, the stream is at {start}")
        waited, slot = time.perf_counter() - t0, self.slot
        self.slot = 1 - slot
        self._ask(start + n)
        return self.buffers[slot][:n], seconds, waited

    def named_state(self) -> dict[str, np.ndarray]:
        """The fp64 state after the last block returned."""
        return self.state

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def serve_fp64(conn, shared, root: str, block: int, chunk: int, threads: int, state: dict | None) -> None:
    """``ChildReference``'s process: fp64 blocks on request, into the shared buffers."""
    try:
        torch.set_num_threads(threads)
        model64 = reference_model(Path(root), read_manifest(root), "cpu")[0].double().eval()
        fp64 = Fp64Stream(model64, chunk, model_state(model64, state))
        buffers = [np.frombuffer(raw, np.float64).reshape(block, -1) for raw in shared]
        while (request := conn.recv()) is not None:
            start, n, slot = request
            conn.send(("block", start, fp64.run(start, buffers[slot][:n]), fp64.named_state()))
    except Exception:  # noqa: BLE001 (the stream raises it with this text)
        conn.send(("error", traceback.format_exc()))


# ---- one block ------------------------------------------------------------------------
@dataclass
class Block:
    index: int
    start: int
    steps: int
    max_abs: float  # max over the block's steps of max |graph logits - fp64 logits|
    mean_step_max: float  # mean over steps of the same per-step max
    worst_step: int  # stream position of the block's max
    max_state: float  # max |graph state| at the block's end
    state_vs_fp64: float  # max |graph state - fp64 state| at the block's end
    nonfinite: int  # NaN/Inf in the block's logits and in the state at its end
    rss_mib: float  # after the block
    graph_s: float  # seconds in the graph's steps
    fp64_s: float  # seconds the fp64 reference took over the block
    wait_s: float  # seconds the stream waited for it (all of fp64_s with --inline)
    wall_s: float  # seconds the block took in all (graph, fp64, comparison)
    segment: int  # which process ran it (0, then 1 after a resume, ...)


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


# ---- checkpoint -----------------------------------------------------------------------
def save_checkpoint(path: Path, session: StreamingSession, fp64_state: dict, meta: dict) -> None:
    """Both states and the run so far in one safetensors file, replaced atomically."""
    tensors = {"graph_state": np.frombuffer(session.save_state(), np.uint8)}
    tensors |= {f"fp64.{k}": v for k, v in fp64_state.items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, tmp, metadata={"soak": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, session: StreamingSession, graph_sha: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The run so far and the fp64 state (graph names); the graph's state goes into ``session``."""
    if not path.is_file():
        raise EdgeseqError(f"--resume: no checkpoint at {path}; run without --resume to start")
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["soak"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    if meta["graph_sha256"] != graph_sha:
        raise EdgeseqError(f"{path} was saved from another step graph; resume with the bundle it came from")
    session.load_state(tensors.pop("graph_state").tobytes())
    return meta, {k.removeprefix("fp64."): v for k, v in tensors.items()}


# ---- verdicts -------------------------------------------------------------------------
def summarize(blocks: list[Block], context: dict, verify: dict, args) -> dict:
    """The run's figures and one verdict per bound."""
    dist = np.array([b.max_abs for b in blocks])
    k = max(1, len(blocks) // 10)
    first, last, overall = float(dist[:k].max()), float(dist[-k:].max()), float(dist.max())
    limit = args.max_distance if args.max_distance is not None else drift_limit(context["fp32_reference_max"])
    graph_s = sum(b.graph_s for b in blocks)
    summary = {
        "steps": int(sum(b.steps for b in blocks)),
        "graph_steps_per_s": sum(b.steps for b in blocks) / graph_s if graph_s else None,
        "stream_steps_per_s": sum(b.steps for b in blocks) / sum(b.wall_s for b in blocks),  # fp64 and checks too
        "nonfinite": int(sum(b.nonfinite for b in blocks)),
        "rss_mib": rss_summary(blocks, args.warmup_blocks),
        "distance": {"first_10pct": first, "last_10pct": last, "overall": overall, "trend": last / first if first else None,
                     "blocks_per_10pct": k, "limit": limit, "max_state": max(b.max_state for b in blocks),
                     "state_vs_fp64": max(b.state_vs_fp64 for b in blocks)},
    }  # fmt: skip
    growth = max(s["growth"] for s in summary["rss_mib"])
    summary["verdicts"] = {
        "finite": [summary["nonfinite"] == 0, f"{summary['nonfinite']} non-finite values"],
        "rss": [None if args.inline else growth <= args.rss_growth_mib,  # --inline: the reference's churn, not judged
                f"RSS grew {growth:.2f} MiB after block {args.warmup_blocks} (bound {args.rss_growth_mib} MiB)"],
        "distance": [overall <= limit, f"max |graph - fp64| {overall:.3g} (limit {limit:.3g})"],
        "trend": [last <= args.max_trend * first, f"last 10% {last:.3g} vs first 10% {first:.3g} (bound {args.max_trend:g}x)"],
        "reference": [verify["max_abs"] <= VERIFY_TOLERANCE, f"fp64 chunked vs steps {verify['max_abs']:.2g}"],
    }  # fmt: skip
    return summary


def rss_summary(blocks: list[Block], warmup: int) -> list[dict]:
    """Per process segment: RSS after its first block, its max and last; the growth past
    RSS at the end of the first ``warmup`` blocks, and the slope after them (MiB per 100k
    steps, least squares): a leak grows steadily, a late one-off allocation does not."""
    out = []
    for segment in sorted({b.segment for b in blocks}):
        mine = [b for b in blocks if b.segment == segment]
        rss, ends = [b.rss_mib for b in mine], [b.start + b.steps for b in mine]
        settled = rss[min(warmup, len(rss)) - 1 :]
        slope = float(np.polyfit(ends[-len(settled) :], settled, 1)[0]) * 1e5 if len(settled) > 2 else None
        out.append({"segment": segment, "blocks": len(rss), "first": rss[0], "max": max(rss), "last": rss[-1],
                    "after_warmup": settled[0], "growth": max(settled) - settled[0], "slope_per_100k": slope})  # fmt: skip
    return out


def print_table(console: Console, result: dict) -> None:
    s, d = result["summary"], result["summary"]["distance"]
    table = Table(
        title=f"soak: {result['model']} at width {result['width']}, {result['onnxruntime']} on {result['cpu']}"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("steps run", f"{s['steps']:,} of {result['args']['steps']:,}"),
        ("steps/s: graph alone (1 thread) / whole stream", f"{s['graph_steps_per_s']:,.0f} / {s['stream_steps_per_s']:,.0f}"),
        ("wall seconds (all segments)", f"{result['wall_s']:,.0f}"),
        ("non-finite values", str(s["nonfinite"])),
        *[(f"RSS MiB seg {r['segment']}: block 1 / max / last; slope per 100k",
           f"{r['first']:.1f} / {r['max']:.1f} / {r['last']:.1f}; {r['slope_per_100k'] or 0:+.2f}") for r in s["rss_mib"]],
        ("max |graph - fp64|: first 10% / last 10%", f"{d['first_10pct']:.3g} / {d['last_10pct']:.3g}"),
        ("max |graph - fp64|: overall (limit)", f"{d['overall']:.3g} ({d['limit']:.3g})"),
        (f"first {result['context']['steps']} steps: fp32 torch / graph vs fp64",
         f"{result['context']['fp32_reference_max']:.3g} / {result['context']['graph_max']:.3g}"),
        ("max |state|; state vs fp64", f"{d['max_state']:.3g}; {d['state_vs_fp64']:.3g}"),
        ("fp64 chunked vs single steps", f"{result['verify']['max_abs']:.2g}"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    for name, (ok, why) in s["verdicts"].items():
        verdict = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "not judged"}[ok]
        table.add_row(f"[bold]{name}[/bold]", f"{verdict} {why}")
    console.print(table)


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
    tokens, graph_sha = Tokens(), manifest["files"][f"{FLAVOR}/step.onnx"]
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
