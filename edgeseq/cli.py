"""The ``edgeseq`` command line: presentation only.

Commands load through ``edgeseq.zoo``, compute through the core modules and print a rich
table, or exactly one JSON document with ``--json``. An ``EdgeseqError`` (bad input) is
printed as one ``error: ...`` line on stderr and exits with its ``exit_code``; anything
else is a bug and raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeseq import __version__
from edgeseq.errors import EdgeseqError, WidthError
from edgeseq.extract import extract as extract_model
from edgeseq.families import FAMILIES, save_checkpoint
from edgeseq.sizing import BYTES_PER_PARAM, kept_per_layer, layer_pattern, nested_sizes, size_of
from edgeseq.width import WidthSpec, resolve
from edgeseq.zoo import DEFAULT_MODEL, load_model

SIZE_NOTE = (
    "int8/int4: 2-D weight matrices at 1 and 1/2 byte per parameter, other parameters "
    "(norms, biases, conv, A_log, D, dt_bias) at fp32, scales not counted. "
    "state/stream: fp32 decode state of one stream."
)


class EdgeseqGroup(click.Group):
    """Turns a user error into one stderr line and its exit code, with no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeseqError as e:
            message = " ".join(str(e).split()) or type(e).__name__
            click.echo(f"error: {message}", err=True)
            ctx.exit(e.exit_code)


def _emit_json(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def _trained(metadata: dict[str, Any]) -> str:
    trained = metadata.get("trained")
    return "trained" if trained is True else "untrained" if trained is False else "trained: unknown"


model_argument = click.argument("model", default=DEFAULT_MODEL, metavar="[MODEL]")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")


@click.group(cls=EdgeseqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeseq")
def main() -> None:
    """Deploy nested Mamba2 and Mamba2/attention hybrid models to edge devices.

    MODEL is a built-in name (mamba2-tiny, the default, or hybrid-tiny) or a checkpoint
    directory in any known format.

    \b
    Example:
      edgeseq inspect
      edgeseq extract --width 0.5 -o out/mamba2-tiny-w0.5
    """


@main.command()
@model_argument
@click.option("--format", "fmt", type=click.Choice(sorted(FAMILIES)), help="Read MODEL as this checkpoint format.")
@json_option
def inspect(model: str, fmt: str | None, as_json: bool) -> None:
    """Show a model's size at each of its nested widths.

    One row per width: parameters, weight bytes at fp32/fp16/int8/int4 and the decode
    state one stream holds.

    \b
    Example:
      edgeseq inspect hybrid-tiny
      edgeseq inspect out/mamba2-tiny-w0.5 --json
    """
    lm, metadata = load_model(model, fmt)
    config = lm.config
    rows = nested_sizes(config)
    header = {
        "model": metadata.get("name", model),
        "format": metadata["format"],
        "trained": metadata.get("trained"),
        "layers": layer_pattern(config),
        "nested_widths": list(config.nested_widths),
        "nested_full": config.is_nested_full(),
    }
    if as_json:
        _emit_json({**header, "sizes": [row.to_dict() for row in rows]})
        return
    console = Console()
    kind = "nested" if header["nested_full"] else "extracted: widths are relative to it"
    console.print(
        f"[bold]{escape(header['model'])}[/bold] ({header['format']}, {_trained(metadata)}, {kind})"
        f"  layers [cyan]{header['layers']}[/cyan]",
        highlight=False,
    )
    table = Table(caption=SIZE_NOTE, caption_justify="left")
    table.add_column("width")
    table.add_column("params", justify="right")
    for dtype in BYTES_PER_PARAM:
        table.add_column(dtype, justify="right")
    table.add_column("state/stream", justify="right")
    for row in rows:
        table.add_row(
            row.label,
            _count(row.params),
            *(_bytes(row.weight_bytes(dtype)) for dtype in BYTES_PER_PARAM),
            _bytes(row.state_bytes),
        )
    console.print(table)


def _width_spec(width: str | None, widths: str | None, n_layer: int) -> WidthSpec:
    if width is not None:
        spec = WidthSpec.parse(width)
        if len(spec.fractions) != 1:
            raise WidthError(f"--width takes one fraction (got {width!r}); use --widths for a per-layer list")
        return spec
    spec = WidthSpec.parse(widths)
    if len(spec.fractions) != n_layer:
        raise WidthError(
            f"--widths has {len(spec.fractions)} values for a model of {n_layer} layers; give {n_layer} or use --width"
        )
    return spec


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@main.command()
@model_argument
@click.option("--width", help="One fraction for every layer: 0.5 or 1/4.")
@click.option("--widths", help="One fraction per layer (Mix'n'Match): 1,1,0.5,0.25,...")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="New checkpoint directory.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(sorted(n for n, f in FAMILIES.items() if f.writable)),
    default="native",
    show_default=True,
    help="Checkpoint format to write.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
def extract(model: str, width: str | None, widths: str | None, output: Path, fmt: str, overwrite: bool, as_json: bool):
    """Cut the submodel at a width out of a nested model and save it.

    The output is written atomically: nothing appears at OUTPUT unless the whole
    checkpoint was written.

    \b
    Example:
      edgeseq extract --width 0.5 -o out/mamba2-tiny-w0.5
      edgeseq extract hybrid-tiny --widths 1,1,0.5,1,0.5,0.5,0.25,1 -o out/hybrid-mix
    """
    if (width is None) == (widths is None):
        raise click.UsageError("give exactly one of --width (one fraction) or --widths (one per layer)")
    lm, metadata = load_model(model)
    config = lm.config
    spec = _width_spec(width, widths, config.n_layer)
    layer_widths = resolve(config, spec)
    sub = extract_model(lm, spec)
    provenance = {k: v for k, v in metadata.items() if k not in ("format", "name")}
    provenance |= {"source": metadata.get("name", model), "source_format": metadata["format"], "width": str(spec)}
    save_checkpoint(sub, output, format=fmt, metadata=provenance, overwrite=overwrite)

    full, kept = size_of(config, resolve(config, None), "stored"), size_of(config, layer_widths, str(spec))
    layers = kept_per_layer(config, layer_widths)
    doc = {
        "source": provenance["source"],
        "output": str(output),
        "format": fmt,
        "width": str(spec),
        "layers": layers,
        "source_size": full.to_dict(),
        "size": kept.to_dict(),
        "bytes_on_disk": _dir_bytes(output),
    }
    if as_json:
        _emit_json(doc)
    else:
        _print_extracted(doc)


def _print_extracted(doc: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"extracted [bold]{escape(doc['source'])}[/bold] at width {doc['width']} -> {escape(doc['output'])} "
        f"({doc['format']})",
        highlight=False,
    )
    table = Table()
    for name in ("layer", "mixer", "heads kept", "MLP units kept"):
        table.add_column(name, justify="left" if name == "mixer" else "right")
    for row in doc["layers"]:
        heads = f"{row['heads']}/{row['heads_total']}"
        if "kv_heads" in row:
            heads += f" (kv {row['kv_heads']}/{row['kv_heads_total']})"
        mlp = f"{row['d_mlp']}/{row['d_mlp_total']}" if row["d_mlp_total"] else "-"
        table.add_row(str(row["layer"]), row["mixer"], heads, mlp)
    console.print(table)
    kept, full = doc["size"], doc["source_size"]
    console.print(
        f"params {_count(kept['params'])} of {_count(full['params'])} ({kept['params'] / full['params']:.1%}); "
        f"fp32 weights {_bytes(kept['weight_bytes']['fp32'])}; "
        f"state/stream {_bytes(kept['state_bytes_per_stream'])}; on disk {_bytes(doc['bytes_on_disk'])}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
