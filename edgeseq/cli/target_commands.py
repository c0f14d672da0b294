"""Target commands: targets, plan."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeseq.cli.common import _bytes, _count, _emit_json, json_option, main, model_argument

TARGETS_NOTE = (
    "memory: what the model may use (weights, state, working memory), not the board's total. "
    "bandwidth: peak DRAM. TFLOPS/TOPS: dense fp16 / int8. *: default precision. "
    "flavors: graphs a bundle carries, the first runs by default. cc: CUDA compute capability."
)
COLUMNS = ("name", "aliases", "memory", "bandwidth", "TFLOPS/TOPS", "runtime", "precisions", "flavors", "cc")
NUMERIC = ("memory", "bandwidth", "TFLOPS/TOPS")


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
    table = Table(caption=TARGETS_NOTE, caption_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in NUMERIC else "left", no_wrap=column in ("name", *NUMERIC))
    for t in shown:
        table.add_row(
            t.name,
            ", ".join(t.aliases),
            _bytes(t.memory_bytes),
            f"{t.bandwidth_gbs:g} GB/s",
            f"{t.fp16_tflops:g} / {t.int8_tops:g}",
            f"{t.runtime} {t.min_runtime_version}+",
            " ".join(p + "*" if p == t.default_precision else p for p in t.precisions),
            ", ".join(t.flavors),
            t.compute_capability or "-",
        )
    console = Console()
    console.print(table)
    if profile:
        t = shown[0]
        for label, text in (("description", t.description), ("note", t.note), ("sources", t.sources), ("file", t.path)):
            if text:
                console.print(f"[bold]{label}[/bold]: {escape(text)}", highlight=False)


PLAN_NOTE = (
    "weights: one graph (a bundle holds step + prefill). peak: both graphs resident, the states, a "
    "{prefill}-token prefill chunk and the runtime. decode: bandwidth roofline at batch 1 with the target's "
    "efficiency factor, a prediction, not a measurement."
)


@main.command()
@model_argument
@click.option("--target", default="x86-64-cpu", show_default=True, help="Device name, alias or profile .toml.")
@click.option("--memory-budget", help="Memory the model may use, e.g. '512 MiB' (default: the target's).")
@click.option("--min-tokens-per-s", type=float, help="Mark configurations predicted slower than this.")
@click.option("--streams", type=int, default=1, show_default=True, help="Concurrent streams (each has a state).")
@json_option
def plan(model, target, memory_budget, min_tokens_per_s, streams, as_json):
    """What each width and precision costs on a target, and what `edgeseq export` would pick.

    Rows: every nested width, a Mix'n'Match model between each pair (first half of the
    layers wider), times every precision the target runs.

    \b
    Example:
      edgeseq plan --target raspberry-pi-5
      edgeseq plan hybrid-tiny --target jetson --memory-budget 64MiB --json
    """
    from edgeseq.errors import EdgeseqError
    from edgeseq.targets import get_target, parse_bytes
    from edgeseq.targets.plan import PREFILL_TOKENS, NoFitError, choose
    from edgeseq.targets.plan import plan as plan_rows
    from edgeseq.zoo import load_model

    if streams < 1:
        raise EdgeseqError("--streams must be at least 1")
    t = get_target(target)
    budget = t.memory_bytes if memory_budget is None else parse_bytes(memory_budget)
    lm, _ = load_model(model)
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
    table = Table(title=f"{model} on {t.name}: {_bytes(budget)} for the model, {t.bandwidth_gbs:g} GB/s",
                  caption=PLAN_NOTE.format(prefill=PREFILL_TOKENS), caption_justify="left")
    for column in ("width", "kind", "precision", "params", "weights", "state/stream", "peak", "decode ms", "tok/s", "fits"):
        table.add_column(column, justify="left" if column in ("width", "kind", "precision", "fits") else "right")
    for r in rows:
        mark = "yes" if r.fits and r.fast_enough else ("too slow" if r.fits else "no")
        style = "bold green" if choice and r == choice.row else ("dim" if mark != "yes" else None)
        table.add_row(r.width, r.kind, r.precision, _count(r.params), _bytes(r.weight_bytes), _bytes(r.state_bytes),
                      _bytes(r.peak_bytes), f"{r.decode_ms:.3f}", f"{r.tokens_per_s:,.0f}", mark, style=style)
    console = Console()
    console.print(table)
    if choice:
        console.print(f"[bold green]export would pick[/] width {escape(choice.row.width)} at {choice.row.precision}:")
        for reason in choice.reasons:
            console.print(f"  - {escape(reason)}", highlight=False)
    else:
        console.print(f"[red]nothing fits[/]: {escape(why_not)}", highlight=False)
