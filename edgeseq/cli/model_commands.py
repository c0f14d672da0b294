"""Model commands: inspect, extract, eval, generate, train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeseq.choices import FORMATS, PRECISIONS, WRITABLE_FORMATS
from edgeseq.cli.common import (
    COMPACT_TABLE,
    DEFAULT_MODEL,
    _bytes,
    _count,
    _emit_json,
    _trained,
    config_option,
    json_option,
    main,
    model_argument,
    require_toolchain,
)
from edgeseq.errors import EdgeseqError, WidthError
from edgeseq.width import WidthSpec, exact_width, resolve, untrained_warning

SIZE_NOTE = (
    "Weights as one exported graph stores them (the sizing model `edgeseq plan` uses): int8/int4 "
    "matrices with their scales, the int8 embedding table at fp32, a tied head stored again as a "
    "matrix, norms/biases/conv/A/D at fp32. state/stream: fp32 decode state of one stream."
)


@main.command()
@model_argument
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Read MODEL as this checkpoint format.")
@config_option
@json_option
def inspect(model: str, fmt: str | None, config_file: Path | None, as_json: bool) -> None:
    """Show a model's size at each of its nested widths.

    One row per width: parameters, weight bytes at fp32/fp16/int8/int4 and the decode
    state one stream holds.

    \b
    Example:
      edgeseq inspect hybrid-tiny
      edgeseq inspect out/mamba2-tiny-w0.5 --json
    """
    require_toolchain("inspect")  # the checkpoint loaders build the torch model
    from edgeseq.sizing import layer_pattern, nested_sizes
    from edgeseq.zoo import load_model

    lm, metadata = load_model(model, fmt, config=config_file)
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
    table = Table(caption=SIZE_NOTE, caption_justify="left", **COMPACT_TABLE)
    table.add_column("width")
    table.add_column("params", justify="right")
    for dtype in PRECISIONS:
        table.add_column(dtype, justify="right")
    table.add_column("state/stream", justify="right")
    for row in rows:
        table.add_row(
            row.label,
            _count(row.params),
            *(_bytes(row.weight_bytes(dtype)) for dtype in PRECISIONS),
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
    type=click.Choice(WRITABLE_FORMATS),
    default="native",
    show_default=True,
    help="Checkpoint format to write.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@config_option
@json_option
def extract(model: str, width: str | None, widths: str | None, output: Path, fmt: str, overwrite: bool,
            config_file: Path | None, as_json: bool):  # fmt: skip
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
    require_toolchain("extract")
    from edgeseq.extract import extract as extract_model
    from edgeseq.families import save_checkpoint
    from edgeseq.sizing import kept_per_layer, size_of
    from edgeseq.zoo import load_model

    lm, metadata = load_model(model, config=config_file)
    source = f"{model} --config {config_file}" if config_file else model
    config = lm.config
    spec = _width_spec(width, widths, config.n_layer)
    layer_widths = resolve(config, spec)
    exact, warning = exact_width(config, spec), untrained_warning(config, spec, source)
    sub = extract_model(lm, spec)
    provenance = {k: v for k, v in metadata.items() if k not in ("format", "name")}
    label = exact.split(" = ")[0]
    provenance |= {"source": metadata.get("name", model), "source_format": metadata["format"], "width": label}
    save_checkpoint(sub, output, format=fmt, metadata=provenance, overwrite=overwrite)

    full, kept = size_of(config, resolve(config, None), "stored"), size_of(config, layer_widths, str(spec))
    layers = kept_per_layer(config, layer_widths)
    doc = {
        "source": provenance["source"],
        "output": str(output),
        "format": fmt,
        "width": label,
        "width_kept": exact,
        "warning": warning,
        "layers": layers,
        "source_size": full.to_dict(),
        "size": kept.to_dict(),
        "bytes_on_disk": _dir_bytes(output),
    }
    if as_json:
        _emit_json(doc)
    else:
        _print_extracted(doc)


def _kept(part: dict[str, int]) -> str:
    """{"heads": 4, "heads_total": 8, "kv_heads": 4, "kv_heads_total": 8} -> "4/8 (kv 4/8)"."""
    counts = [(k, v, part[f"{k}_total"]) for k, v in part.items() if not k.endswith("_total")]
    (_, kept, total), rest = counts[0], counts[1:]
    return f"{kept}/{total}" + "".join(f" ({k.split('_')[0]} {v}/{t})" for k, v, t in rest)


def _print_extracted(doc: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"extracted [bold]{escape(doc['source'])}[/bold] at width {doc['width']} -> {escape(doc['output'])} "
        f"({doc['format']})",
        highlight=False,
    )
    table = Table(**COMPACT_TABLE)
    for name in ("layer", "part", "kept"):
        table.add_column(name, justify="left" if name == "part" else "right")
    for row in doc["layers"]:
        for n, (kind, kept) in enumerate(row["parts"].items()):
            table.add_row(str(row["layer"]) if n == 0 else "", kind, _kept(kept))
    console.print(table)
    if doc["width_kept"] != doc["width"]:
        console.print(f"width {doc['width_kept']} kept in every layer", highlight=False)
    if doc["warning"]:
        Console(stderr=True).print(f"[yellow]warning:[/] {doc['warning']}", highlight=False)
    kept, full = doc["size"], doc["source_size"]
    console.print(
        f"params {_count(kept['params'])} of {_count(full['params'])} ({kept['params'] / full['params']:.1%}); "
        f"fp32 weights {_bytes(kept['weight_bytes']['fp32'])}; "
        f"state/stream {_bytes(kept['state_bytes_per_stream'])}; on disk {_bytes(doc['bytes_on_disk'])}",
        highlight=False,
    )



@main.command(name="eval")
@model_argument
@click.option("--width", "widths", multiple=True, help="Width to evaluate (repeatable); default: every nested width.")
@click.option("--tokens", type=int, default=0, help="Evaluate only the first N tokens of the sample (0: all).")
@click.option("--segments", type=int, default=16, show_default=True, help="Sample pieces evaluated side by side.")
@config_option
@json_option
def eval_(model: str, widths: tuple[str, ...], tokens: int, segments: int, config_file: Path | None, as_json: bool) -> None:
    """Held-out bits per byte at each nested width, on the sample shipped with edgeseq.

    \b
    Example:
      edgeseq eval
      edgeseq eval hybrid-tiny --width 0.5 --tokens 32768 --segments 4 --json
    """
    require_toolchain("eval")
    from edgeseq.evaluate import bits_per_byte
    from edgeseq.tokenizer import tokenize_sample, tokenizer_of
    from edgeseq.zoo import load_model

    lm, metadata = load_model(model, config=config_file)
    tokenizer = tokenizer_of(model)  # bytes for a built-in model; else the checkpoint's tokenizer.json, if any
    tokenizer.check_vocab(lm.config.vocab_size)
    sample = tokenize_sample(tokenizer, tokens + 1 if tokens else None)
    if segments < 1 or len(sample) - 1 < segments:
        raise EdgeseqError(f"--segments must be between 1 and {len(sample) - 1} for this sample")
    chosen = [WidthSpec.parse(w) for w in widths] or [WidthSpec.uniform(w) for w in lm.config.nested_widths]
    rows = []
    for spec in chosen:
        resolve(lm.config, spec)  # a bad width fails before any work
        bpb = bits_per_byte(lm, sample, spec, segments=segments)
        rows.append({"width": str(spec), "bits_per_byte": round(bpb, 5)})
    doc = {"model": metadata.get("name", model), "trained": metadata.get("trained"), "tokens": len(sample) - 1,
           "tokenizer": tokenizer.kind, "segments": segments, "results": rows}
    if as_json:
        _emit_json(doc)
        return
    console = Console()
    console.print(f"{escape(doc['model'])}: held-out bits per byte ({doc['tokens']} tokens, {_trained(metadata)})",
                  highlight=False)  # fmt: skip
    table = Table(**COMPACT_TABLE)
    table.add_column("width", no_wrap=True)
    table.add_column("bits/byte", justify="right")
    for row in rows:
        table.add_row(row["width"], f"{row['bits_per_byte']:.4f}")
    console.print(table)


@main.command()
@click.option("--model", "model", default=DEFAULT_MODEL, show_default=True, help="Built-in name or checkpoint dir.")
@click.option("--width", default="1", show_default=True, help="Nested width to run at.")
@click.option("--prompt", default="def ", show_default=True, help="Text the stream starts from.")
@click.option("-n", "n", type=int, default=200, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 samples greedily.")
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed, for repeatable output.")
@config_option
@json_option
def generate(model: str, width: str, prompt: str, n: int, temperature: float, top_k: int, seed, config_file, as_json: bool):
    """Stream text from a model on the CPU through the reference path and report tokens/s.

    \b
    Example:
      edgeseq generate --model mamba2-tiny --width 0.25 --prompt "def " -n 200
    """
    require_toolchain("generate", instead="stream from a bundle with `edgeseq run BUNDLE`")
    import sys

    from edgeseq.generate import GenerationStats
    from edgeseq.generate import generate as stream

    if n < 1:
        raise EdgeseqError("-n must be at least 1")
    from edgeseq.extract import extract as extract_model
    from edgeseq.tokenizer import tokenizer_of
    from edgeseq.zoo import load_model

    lm, _ = load_model(model, config=config_file)
    tokenizer = tokenizer_of(model)
    spec = WidthSpec.parse(width)
    resolve(lm.config, spec)
    if any(f != 1.0 for f in spec.fractions):
        lm = extract_model(lm, spec)  # slice once, not at every step
    stats: list[GenerationStats] = []
    decoder = tokenizer.stream_decoder(after=tokenizer.prompt_ids(prompt))
    pieces: list[str] = []
    if not as_json:
        sys.stdout.write(prompt)
    for token in stream(lm, prompt, n, None, temperature, top_k, seed, stats, tokenizer):
        pieces.append(decoder.step(token))
        if not as_json:
            sys.stdout.write(pieces[-1])
            sys.stdout.flush()
    pieces.append(decoder.flush())
    s = stats[0]
    text = "".join(pieces)
    if as_json:
        _emit_json({"prompt": prompt, "text": text, "width": str(spec), "new_tokens": s.new_tokens,
                    "tokens_per_s": round(s.tokens_per_s, 2), "prefill_s": round(s.prefill_s, 4)})
    else:
        sys.stdout.write(pieces[-1] + "\n")
        click.echo(f"-- {s.new_tokens} tokens at {s.tokens_per_s:.1f} tokens/s (width {spec}, CPU reference)", err=True)


@main.command()
@click.option("--model", "model", type=click.Choice(["mamba2-tiny", "hybrid-tiny"]), default=DEFAULT_MODEL)
@click.option("--steps", type=int, default=2200, show_default=True)
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--compile/--no-compile", default=None, help="torch.compile the model (default: on CUDA).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Run directory.")
@json_option
def train(model: str, steps: int, batch: int, seq_len: int, lr: float, seed: int, compile, output: Path, as_json: bool):
    """Train a built-in architecture from scratch with the Matryoshka recipe (all nested
    widths every step) on this interpreter's standard library; bf16 on CUDA.

    Writes OUTPUT/train_log.jsonl, the data manifest, the held-out sample and the
    checkpoint OUTPUT/MODEL (fp16 weights; metadata holds the held-out bits per byte).

    \b
    Example:
      edgeseq train --model mamba2-tiny --steps 2200 -o runs/mamba2-tiny
    """
    require_toolchain("train")
    import torch

    from edgeseq.train import TrainConfig
    from edgeseq.train import train as run_training

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tc = TrainConfig(model=model, steps=steps, batch=batch, seq_len=seq_len, lr=lr, seed=seed,
                     compile=device == "cuda" if compile is None else compile)
    metadata = run_training(tc, output, device)
    if as_json:
        _emit_json(metadata)
    else:
        for width, figures in metadata["eval"].items():
            click.echo(f"width {width}: held-out {figures['heldout_bpb']:.4f} bits/byte")

