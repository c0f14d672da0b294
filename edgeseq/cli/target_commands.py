"""Target commands: targets, plan."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeseq.cli.common import (
    COMPACT_TABLE,
    _bytes,
    _count,
    _emit_json,
    config_option,
    json_option,
    main,
    model_argument,
    require_toolchain,
)

TARGETS_NOTE = (
    "memory: what the model may use (weights, state, working memory), not the board's total. "
    "GB/s: peak DRAM bandwidth. TFLOPS/TOPS: dense fp16 / int8. cc: CUDA compute capability. "
    "*: default precision. flavors: graphs a bundle carries, the first runs by default."
)
# Two tables, each readable in 80 columns: the hardware, then what runs on it.
HARDWARE = ("name", "aliases", "memory", "GB/s", "TFLOPS/TOPS", "cc")
SOFTWARE = ("name", "min runtime", "precisions", "flavors")
NUMERIC = ("memory", "GB/s", "TFLOPS/TOPS")


@main.command()
@click.argument("profile", required=False, metavar="[PROFILE]")
@json_option
def targets(profile: str | None, as_json: bool) -> None:
    """List the device profiles, or check and show one.

    PROFILE is a built-in name or alias, or the path of your own profile file (TOML; copy
    one from the package's targets/profiles/ to start). A profile is checked strictly:
    every mistake is reported with its file and line or key.

    \b
    Example:
      edgeseq targets
      edgeseq targets my-board.toml --json
    """
    from edgeseq.targets import all_targets, get_target

    shown = [get_target(profile)] if profile else all_targets()
    if as_json:
        _emit_json({"targets": [t.to_dict() for t in shown]})
        return
    hardware, software = Table(**COMPACT_TABLE), Table(caption=TARGETS_NOTE, caption_justify="left", **COMPACT_TABLE)
    for table, columns in ((hardware, HARDWARE), (software, SOFTWARE)):
        for column in columns:
            lists = column in ("aliases", "precisions", "flavors")  # these wrap between items
            table.add_column(column, justify="right" if column in NUMERIC else "left", no_wrap=not lists)
    for t in shown:
        hardware.add_row(t.name, ", ".join(t.aliases), _bytes(t.memory_bytes), f"{t.bandwidth_gbs:g}",
                         f"{t.fp16_tflops:g} / {t.int8_tops:g}", t.compute_capability or "-")  # fmt: skip
        software.add_row(t.name, f"{t.runtime} {t.min_runtime_version.removesuffix('.0')}",
                         " ".join(p + "*" if p == t.default_precision else p for p in t.precisions), ", ".join(t.flavors))  # fmt: skip
    console = Console()
    console.print(hardware)
    console.print()
    console.print(software)
    if profile:
        t = shown[0]
        for label, text in (("description", t.description), ("note", t.note), ("sources", t.sources), ("file", t.path)):
            if text:
                console.print(f"[bold]{label}[/bold]: {escape(text)}", highlight=False)


PLAN_NOTE = (
    "Sizes in MiB. a..b: Mix'n'Match, the first half of the layers at width a, the rest at b "
    "(--json gives the per-layer widths). weights: one graph (a bundle holds step + prefill). state: per stream. "
    "peak: a Python process streaming the bundle with onnxruntime, a {prefill}-token prompt included "
    "(what `edgeseq bench` measures). ms/tok: bandwidth roofline at batch 1 with the target's efficiency "
    "factor, a prediction, not a measurement."
)


@main.command()
@model_argument
@click.option("--target", default="x86-64-cpu", show_default=True, help="Device name, alias or profile .toml.")
@click.option("--memory-budget", help="Memory the model may use, e.g. '512 MiB' (default: the target's).")
@click.option("--min-tokens-per-s", type=float, help="Mark configurations predicted slower than this.")
@click.option("--streams", type=int, default=1, show_default=True, help="Concurrent streams (each has a state).")
@config_option
@json_option
def plan(model, target, memory_budget, min_tokens_per_s, streams, config_file, as_json):
    """What each width and precision costs on a target, and what `edgeseq export` would pick.

    Rows: every nested width, a Mix'n'Match model between each pair (first half of the
    layers wider), times every precision the target runs.

    \b
    Example:
      edgeseq plan --target raspberry-pi-5
      edgeseq plan hybrid-tiny --target jetson --memory-budget 64MiB --json
    """
    require_toolchain("plan")  # the model's config comes through the checkpoint loaders, which are torch
    from edgeseq.errors import EdgeseqError
    from edgeseq.targets import get_target, parse_bytes
    from edgeseq.targets.plan import PREFILL_TOKENS, NoFitError, choose
    from edgeseq.targets.plan import plan as plan_rows
    from edgeseq.zoo import load_model

    if streams < 1:
        raise EdgeseqError("--streams must be at least 1")
    t = get_target(target)
    budget = t.memory_bytes if memory_budget is None else parse_bytes(memory_budget)
    lm, _ = load_model(model, config=config_file)
    rows = plan_rows(lm.config, t, streams, min_tokens_per_s, budget)
    try:
        choice, why_not = choose(rows, t, budget, min_tokens_per_s), None
    except NoFitError as e:
        choice, why_not = None, str(e)
    if as_json:
        _emit_json({"model": model, "target": t.to_dict(), "budget_bytes": budget, "streams": streams,
                    "rows": [r.to_dict() for r in rows],
                    "choice": {"row": choice.row.to_dict(), "reasons": list(choice.reasons)} if choice else None,
                    "no_fit": why_not})
        return
    console = Console()
    console.print(f"{escape(model)} on {t.name}: {_bytes(budget)} for the model, {t.bandwidth_gbs:g} GB/s",
                  highlight=False)  # fmt: skip
    table = Table(caption=PLAN_NOTE.format(prefill=PREFILL_TOKENS), caption_justify="left", **COMPACT_TABLE)
    for column in ("width", "prec", "params", "weights", "state", "peak", "ms/tok", "tok/s", "fits"):
        table.add_column(column, justify="left" if column in ("width", "prec", "fits") else "right", no_wrap=True)
    for r in rows:
        mark = "yes" if r.fits and r.fast_enough else ("too slow" if r.fits else "no")
        style = "bold green" if choice and r == choice.row else ("dim" if mark != "yes" else None)
        table.add_row(_short_width(r.width), r.precision, _count(r.params), _mib(r.weight_bytes), _mib(r.state_bytes),
                      _mib(r.peak_bytes), f"{r.decode_ms:.3f}", f"{r.tokens_per_s:,.0f}", mark, style=style)  # fmt: skip
    console.print(table)
    if choice:
        console.print(f"[bold green]export would pick[/] width {escape(choice.row.width)} at {choice.row.precision}:")
        for reason in choice.reasons:
            console.print(f"  - {escape(reason)}", highlight=False)
    else:
        console.print(f"[red]nothing fits[/]: {escape(why_not)}", highlight=False)


def _short_width(spec: str) -> str:
    """A width as the plan table shows it: a per-layer list (Mix'n'Match) as "first..last"."""
    parts = spec.split(",")
    return spec if len(parts) == 1 else f"{parts[0]}..{parts[-1]}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"
