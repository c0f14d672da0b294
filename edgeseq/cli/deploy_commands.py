"""Deployment commands: export, validate, run, bench."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars
from rich.text import Text

from edgeseq.choices import DEVICES, FLAVORS, PRECISIONS
from edgeseq.cli.common import COMPACT_TABLE, _emit_json, config_option, json_option, main, require_toolchain
from edgeseq.deploy.progress import WARNING, Progress, Stage, StageClock
from edgeseq.deploy.runtimes import TENSORRT
from edgeseq.errors import EdgeseqError
from edgeseq.width import WidthSpec

GRAPH_TOOLCHAIN = ("torch", "onnx", "onnxscript")  # what building and rewriting ONNX graphs imports
FLAVOR_CHOICE = click.Choice(FLAVORS)
PRECISION_CHOICE = click.Choice(PRECISIONS)
DEVICE_CHOICE = click.Choice(DEVICES)


def _spec(width: str | None, widths: str | None) -> WidthSpec | None:
    if width is not None and widths is not None:
        raise EdgeseqError("give one of --width (one fraction) or --widths (one per layer), not both")
    text = width if width is not None else widths
    return None if text is None else WidthSpec.parse(text)


def _budget(text: str | None) -> int | None:
    from edgeseq.targets import parse_bytes

    return None if text is None else parse_bytes(text)


LIVE_WIDTH = 40  # of the running stage's line: room for its time, the bar and the calls in 80 columns


class _ProgressPrinter(Progress):
    """One line per stage as it ends, with the seconds it took (``export portable ... 4.2 s``);
    on a terminal also the running stage with its time so far, and during validation a bar
    of graph calls with the time left (rich draws those only on a terminal)."""

    def __init__(self, console: Console):
        self.console, self.clock = console, StageClock()
        self.live, self.task = None, None
        self.counting: list = []  # tasks that count graph calls

    def __call__(self, stage: str, detail: str) -> None:
        if stage == WARNING:
            self.console.print(f"[bold yellow]{stage:>8}[/] {detail}", highlight=False)
            return
        self._print(self.clock.begin(stage, detail))
        line = f"{stage:>8} {detail}"
        self.task = self._live().add_task(line if len(line) <= LIVE_WIDTH else line[: LIVE_WIDTH - 3] + "...", total=None)

    def calls(self, flavor: str):
        """A (done, total) callback for ``validate_flavors``: the running stage's bar for the
        first flavor, a bar of its own for any other (and in ``edgeseq validate``, which has
        no stages)."""
        live = self._live()
        if self.task is None or self.task in self.counting:
            task = live.add_task(f"validate {flavor}", total=None)
        else:
            task = self.task
        self.counting.append(task)
        return lambda done, total: live.update(task, completed=done, total=total)

    def close(self) -> None:
        """End the last stage (its line), the live display, and say how long it all took."""
        self._print(self.clock.end())
        if self.clock.done:
            self.console.print(f"[dim]{'total':>8} {self.clock.total():.1f} s[/]", highlight=False)
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _print(self, ended: Stage | None) -> None:
        if ended is None:
            return
        if self.live is not None:
            for task in {*self.counting, *([self.task] if self.task is not None else [])}:
                self.live.remove_task(task)
        self.task, self.counting = None, []
        took = f" [dim]... {ended.seconds:.1f} s[/]" if ended.seconds >= 0.05 else ""  # a note (plan): no time
        self.console.print(f"[bold cyan]{ended.name:>8}[/] {ended.detail}{took}", highlight=False)

    def _live(self) -> Bars:
        if self.live is None:
            self.live = Bars(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                             _CallsBar(bar_width=20), _CallsColumn(), console=self.console, transient=True)  # fmt: skip
            self.live.start()
        return self.live


class _CallsBar(BarColumn):
    """A bar for a task that counts graph calls; nothing for a stage that does not."""

    def render(self, task):
        return super().render(task) if task.total is not None else Text("")


class _CallsColumn(ProgressColumn):
    """Graph calls made of those expected and the time left, for a task that counts them."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text("")
        left = task.time_remaining
        eta = "" if left is None else f", about {left:.0f} s left"
        return Text(f"{task.completed:.0f}/{task.total:.0f} calls{eta}")


def _progress_printer(console: Console) -> _ProgressPrinter:
    return _ProgressPrinter(console)


def _bundle_name(model: str | None, target: str, spec: WidthSpec | None, precision: str | None,
                 elastic: bool = False) -> Path:  # fmt: skip
    width = "-elastic" if elastic else "-wauto" if spec is None else "-w" + str(spec).replace("/", "_").replace(",", "_")
    return Path("out") / f"{Path(model).name if model else 'mamba2-tiny'}-{target}{width}{'-' + precision if precision else ''}"


@main.command()
@click.option("--model", default=None, help="Built-in name or checkpoint directory (default: mamba2-tiny).")
@click.option("--target", default="x86-64-cpu", show_default=True,
              help="Device name or alias (`edgeseq targets`), or a profile .toml.")
@click.option("--width", help="One fraction for every layer: 0.5 or 1/4 (default: the widest that fits).")
@click.option("--widths", help="One fraction per layer (Mix'n'Match).")
@click.option("--quant", "--precision", "precision", type=PRECISION_CHOICE,
              help="fp32, fp16, int8 or int4 (default: the target's; the state stays fp32).")
@click.option("--memory-budget", help="Memory the model may use, e.g. '512 MiB' (default: the target's).")
@click.option("--min-tokens-per-s", type=float, help="Without --width: only configurations predicted this fast.")
@click.option("--int4-block-size", type=int, default=32, show_default=True, help="Weights per int4 scale.")
@click.option("--flavor", type=FLAVOR_CHOICE, help="Graph flavor (default: the target's).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Bundle directory (default: out/MODEL-TARGET-wWIDTH).")
@click.option("--steps", type=int, default=256, show_default=True, help="Decode steps compared in validation.")
@click.option("--long-steps", type=int, default=4096, show_default=True, help="Length of the drift stream.")
@click.option("--no-validate", is_flag=True, help="Skip validation (the manifest says so).")
@click.option("--embed-reference", is_flag=True, help="Carry the fp32 reference checkpoint in the bundle.")
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True,
              help="Where the PyTorch reference runs during validation.")
@click.option("--threads", type=int,
              help="Threads onnxruntime and PyTorch each use during validation (default: 1; they run side by side).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--elastic", is_flag=True,
              help="Every width of --widths-set (default: the checkpoint's trained widths) in one bundle, one weight "
                   "store; StreamingSession.set_width switches mid-stream.")
@click.option("--widths-set", help="With --elastic: the widths, comma-separated (1,1/2,1/4).")
@config_option
@json_option
def export(model, target, width, widths, precision, memory_budget, min_tokens_per_s, int4_block_size, flavor, output,
           steps, long_steps, no_validate, embed_reference, device, threads, overwrite, elastic, widths_set, config_file,
           as_json):  # fmt: skip
    """Plan, extract, export, quantize, validate and bundle a submodel for a device.

    Without --width, the widest configuration that fits the target's memory (and
    --min-tokens-per-s) is picked, and the choice is explained. The bundle (ONNX step and
    prefill graphs, manifest.json with sha256 of every file, a README for the device) is
    written atomically, and only if every graph that can run here passes validation.

    \b
    Example:
      edgeseq export --target jetson --width 0.5
      edgeseq export --target raspberry-pi-5
      edgeseq export --model hybrid-tiny --target x86 --width 1/4 --quant int8 -o out/h
      edgeseq export --elastic --widths-set 1,1/2,1/4,1/8 --target jetson
    """
    require_toolchain("export", *GRAPH_TOOLCHAIN)
    from edgeseq.deploy.pipeline import ExportRequest, export_bundle
    from edgeseq.targets import get_target

    spec = _spec(width, widths)
    if widths_set is not None and not elastic:
        raise EdgeseqError("--widths-set gives an elastic bundle's widths; add --elastic")
    elastic_set = None if not elastic else tuple(WidthSpec.parse(w) for w in (widths_set or "").split(",") if w.strip())
    budget = _budget(memory_budget)
    name = get_target(target).name
    output = output or _bundle_name(model, name, spec, precision, elastic)
    req = ExportRequest(model, target, spec, output, flavor, precision, steps=steps, long_steps=long_steps,
                        validate=not no_validate, overwrite=overwrite, memory_budget=budget,
                        min_tokens_per_s=min_tokens_per_s, int4_block_size=int4_block_size,
                        embed_reference=embed_reference, threads=threads, reference_device=device,
                        config=None if config_file is None else str(config_file), elastic=elastic_set)
    console = Console(stderr=as_json)
    printer = _progress_printer(console)
    try:
        manifest = export_bundle(req, printer)
    finally:
        printer.close()
    _report_bundle(console, output, manifest, as_json)


def _report_bundle(console: Console, output: Path, manifest: dict, as_json: bool) -> None:
    if as_json:
        _emit_json({"output": str(output), "manifest": manifest})
        return
    widths = ", ".join((manifest.get("elastic") or {}).get("widths") or [manifest["width"]])
    console.print(f"[bold green]bundle[/] {output} (width {widths}, {manifest['precision']}): "
                  f"{manifest['validation']['summary']}", highlight=False)
    for flavor_name, why in manifest["validation"]["not_run"].items():
        console.print(f"[yellow]not validated here[/]: {flavor_name} ({why})", highlight=False)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--quant", "--precision", "precision", type=PRECISION_CHOICE, required=True, help="fp16, int8 or int4.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="New bundle (default: BUNDLE-PRECISION).")
@click.option("--int4-block-size", type=int, default=32, show_default=True)
@click.option("--reference", help="Source model for validation when the manifest's is not here.")
@click.option("--steps", type=int, default=256, show_default=True)
@click.option("--long-steps", type=int, default=4096, show_default=True)
@click.option("--no-validate", is_flag=True)
@click.option("--overwrite", is_flag=True)
@json_option
def quantize(bundle, precision, output, int4_block_size, reference, steps, long_steps, no_validate, overwrite, as_json):
    """Quantize an fp32 bundle's graphs into a new, validated bundle.

    \b
    Example:
      edgeseq quantize out/mamba2-tiny-x86-64-cpu-w0.5 --quant int4 -o out/w0.5-int4
    """
    require_toolchain("quantize", *GRAPH_TOOLCHAIN)
    from edgeseq.deploy.pipeline import quantize_bundle

    if precision == "fp32":
        raise EdgeseqError("the bundle is already fp32; use --quant fp16, int8 or int4")
    output = output or bundle.with_name(f"{bundle.name}-{precision}")
    console = Console(stderr=as_json)
    printer = _progress_printer(console)
    try:
        manifest = quantize_bundle(bundle, precision, output, overwrite=overwrite, block_size=int4_block_size,
                                   validate=not no_validate, steps=steps, long_steps=long_steps, reference=reference,
                                   progress=printer)  # fmt: skip
    finally:
        printer.close()
    _report_bundle(console, output, manifest, as_json)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--flavor", type=FLAVOR_CHOICE, help="Validate only this flavor's graphs.")
@click.option("--steps", type=int, default=256, show_default=True)
@click.option("--long-steps", type=int, default=4096, show_default=True)
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True,
              help="Where the PyTorch reference runs.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the JSON report here (one per flavor: FLAVOR-REPORT).")
@click.option("--plot", type=click.Path(path_type=Path), help="Write the long-stream error plot here (PNG).")
@click.option("--save-golden", type=click.Path(path_type=Path), help="Record reference inputs/outputs (safetensors).")
@click.option("--golden", type=click.Path(path_type=Path), help="Validate against a golden file; needs no PyTorch.")
@click.option("--reference", help="Source model (name or checkpoint) when the manifest's is not on this machine.")
@json_option
def validate(bundle, flavor, steps, long_steps, device, report, plot, save_golden, golden, reference, as_json):
    """Compare a bundle's graphs with the PyTorch reference (fp32, on CUDA when there is a
    GPU): held-out prompts, decode steps with the state fed back, one long stream.
    Exits 1 if any graph fails its precision's tolerances.

    \b
    Example:
      edgeseq validate out/mamba2-tiny-jetson-orin-nano-8gb-w0.5 --report report.json --plot drift.png
      edgeseq validate BUNDLE --save-golden golden.safetensors      # on a machine with PyTorch
      edgeseq validate BUNDLE --golden golden.safetensors           # on the device, no PyTorch
    """
    if not golden:
        require_toolchain("validate", "torch", *(("matplotlib",) if plot else ()),
                          instead="without it, validate against a golden file: --golden FILE")  # fmt: skip
    from edgeseq.deploy.validation import run_validation

    printer = _progress_printer(Console(stderr=True))
    try:
        outcome = run_validation(bundle, flavor, steps, long_steps, device, report, plot, save_golden, golden,
                                 reference, progress=printer.calls)  # fmt: skip
        if not golden:  # an elastic bundle's narrower widths and its switching stream (a golden file holds the widest)
            from edgeseq.deploy.switching import validate_elastic

            validate_elastic(outcome, bundle, flavor, steps, long_steps, device, reference, progress=printer.calls)
    finally:
        printer.close()
    if as_json:
        _emit_json(outcome)
    else:
        console = Console()
        console.print(f"reference: {outcome['reference']}", highlight=False)
        for name, res in outcome["flavors"].items():
            mark = "[green]pass[/]" if res["passed"] else "[red]FAIL[/]"
            console.print(f"{name}: {mark} {res['summary']}", highlight=False)
        for name, why in outcome["not_run"].items():
            console.print(f"[yellow]not run here[/]: {name} ({why})", highlight=False)
        if "genai" in outcome:
            console.print(outcome["genai"]["summary"], highlight=False)
    if not outcome["passed"]:
        raise SystemExit(1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", default="def ", show_default=True)
@click.option("-n", "n", type=int, default=200, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 samples greedily.")
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--flavor", type=FLAVOR_CHOICE, help="Which graphs to run (default: the bundle's first).")
@click.option("--threads", type=int, default=None,
              help="Runtime threads (default: the target profile's, at most this machine's cores; 0: all cores).")
@click.option("--width", help="An elastic bundle's width to stream at (default: its widest).")
@click.option("--elastic", is_flag=True, help="Switch between an elastic bundle's widths (needs --latency-budget-ms).")
@click.option("--latency-budget-ms", "budget", help="With --elastic: keep the widest width whose decode step fits; "
              "MS, or MS,MS@TOKEN,... to change it as the stream goes (40,10@200).")
@click.option("--widen", type=click.Choice(["replay", "zeros"]), default="replay", show_default=True,
              help="How a switch to a wider width fills the new heads' state.")
@json_option
def run(bundle, prompt, n, temperature, top_k, seed, flavor, threads, width, elastic, budget, widen, as_json):
    """Stream text from a bundle through onnxruntime; PyTorch is not imported. Text goes
    through the bundle's tokenizer.json when it carries one, else bytes.

    \b
    Example:
      edgeseq run out/mamba2-tiny-x86-64-cpu-w0.5 --prompt "import " -n 300
      edgeseq run out/mamba2-tiny-x86-64-cpu-elastic --elastic --latency-budget-ms 2.5
    """
    from edgeseq.deploy.run import BudgetSchedule, stream_text

    if n < 1:
        raise EdgeseqError("-n must be at least 1")
    if elastic != (budget is not None):
        raise EdgeseqError("--elastic and --latency-budget-ms go together: the budget decides the width")
    pieces: list[str] = []
    emit = pieces.append if as_json else (lambda text: click.echo(text, nl=False))
    schedule = None if budget is None else BudgetSchedule.parse(budget)
    stats = stream_text(bundle, prompt, n, temperature, top_k, seed, flavor, threads, emit, width, schedule, widen)
    if as_json:
        _emit_json({"text": "".join(pieces), **stats})
        return
    click.echo("")
    click.echo(f"-- {stats['new_tokens']} tokens at {stats['tokens_per_s']:.1f} tokens/s "
               f"({stats['flavor']}, onnxruntime {stats['providers']}, width {stats['width']})", err=True)
    for s in stats.get("switches", []):
        click.echo(f"-- token {s['token']}: width {s['from']} -> {s['to']} (budget {s['budget_ms']:g} ms)", err=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--steps", type=int, default=200, show_default=True, help="Decode steps timed per runtime.")
@click.option("--prompt-len", type=int, default=512, show_default=True, help="Prompt length for prefill tokens/s.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Also write the JSON here.")
@click.option("--runtime", "only", multiple=True, help="Only this runtime (repeatable): onnxruntime:portable, torch, ...")
@json_option
def bench(bundle, steps, prompt_len, threads, out, only, as_json):
    """Decode latency per token, prefill tokens/s and peak RSS for each runtime that can run
    the bundle here (each in its own process, so peak RSS is its own).

    \b
    Example:
      edgeseq bench out/mamba2-tiny-x86-64-cpu-w0.5 --threads 2 --out bench.json
    """
    import json

    from edgeseq.deploy.bench import bench_bundle

    rows = bench_bundle(bundle, steps, prompt_len, threads, list(only) or None)
    doc = {"bundle": str(bundle), "threads": threads, "steps": steps, "prompt_len": prompt_len, "rows": rows}
    if out:
        out.write_text(json.dumps(doc, indent=1) + "\n")
    if as_json:
        _emit_json(doc)
        return
    from rich.table import Table

    console = Console()
    console.print(f"{bundle} (batch 1, {threads} threads, a {prompt_len}-token prompt)", markup=False, highlight=False)
    table = Table(**COMPACT_TABLE)
    for col in ("runtime", "ms/token", "tokens/s", "prefill tokens/s", "peak RSS MiB"):
        table.add_column(col, justify="left" if col == "runtime" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["runtime"], f"{r['decode_ms']:.3f}", f"{1e3 / r['decode_ms']:.1f}",
                      f"{r['prefill_tokens_per_s']:.0f}", f"{r['peak_rss_bytes'] / 2**20:.0f}")
    console.print(table)


@main.command("build-engine")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", help="Profile the engine is for (default: the bundle's); its GPU must be this one.")
@click.option("--flavor", type=click.Choice(TENSORRT.flavors),
              help="Graphs to build from (default: tensorrt if the bundle has it, else portable).")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Largest batch the engines take.")
@click.option("--max-sequence", type=int, default=2048, show_default=True, help="Longest prefill the engine takes.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Engine directory (default: BUNDLE/engines/NAME).")
@json_option
def build_engine(bundle, target, flavor, max_batch, max_sequence, output, as_json):
    """Build TensorRT engines from a bundle, on the device that runs them (needs TensorRT;
    the tensorrt flavor's plugins need TensorRT >= 10.9, i.e. JetPack 7 on Jetson).

    \b
    Example (on the Jetson):
      edgeseq build-engine out/mamba2-tiny-jetson-orin-nano-8gb-w0.5
    """
    from edgeseq.deploy.engine import build_engines

    console = Console(stderr=as_json)
    printer = _progress_printer(console)
    try:
        path = build_engines(bundle, target, flavor, max_batch, max_sequence, output, printer)
    finally:
        printer.close()
    if as_json:
        _emit_json({"engines": str(path)})
    else:
        console.print(f"engines in {path}")
