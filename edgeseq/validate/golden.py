"""Golden files: the reference's inputs and outputs, call by call, in one safetensors file,
so that a candidate can be checked later, on a device without torch.

Layout of a golden file:

    tensors   "{call:06d}/in/{name}", "{call:06d}/out/{name}"   (numpy dtypes as saved)
    metadata  "edgeseq.golden": JSON {format, state_pairs, info, calls: [{phase, stream,
              inputs, outputs, state_from_previous}]}

Consecutive calls with the same ``stream`` id form a decode stream. Within one, a call's
state inputs equal the previous call's present outputs, so they are not stored twice
(``state_from_previous``) and are rebuilt on load.

This module and everything it imports must not import torch (a test checks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from edgeseq.atomic import atomic_file
from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import GraphIO, Tolerance
from edgeseq.validate.compare import (
    DECODE_STEPS,
    Record,
    Runner,
    as_tokens,
    describe_runner,
    infer_arrays,
    random_prompts,
    run_calls,
    run_stream,
    takes_whole_prompt,
    token_input,
    vocab_size,
    zero_state,
)
from edgeseq.validate.results import CompareResult, Comparison, resolve_tolerance

GOLDEN_FORMAT = 1
HEADER_KEY = "edgeseq.golden"


class GoldenError(EdgeseqError):
    """A golden file is missing, damaged or of an unknown format."""


@dataclass
class GoldenRecord:
    """One reference call."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    phase: str = "golden"  # judged with results.PHASE_CHECKS[phase]
    stream: int | None = None  # calls of one decode stream share an id


@dataclass
class Golden:
    records: list[GoldenRecord]
    state_pairs: tuple[tuple[str, str], ...] = ()
    info: dict = field(default_factory=dict)  # reference runner, model, anything to audit


def save_golden(
    path: str | Path,
    records: Sequence[GoldenRecord | tuple[Mapping, Mapping]] | Golden,
    *,
    state_pairs: Sequence[tuple[str, str]] = (),
    info: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Write records (or a ``Golden``, whose pairs and info then apply) atomically."""
    if isinstance(records, Golden):
        state_pairs, info, records = records.state_pairs, records.info, records.records
    records = [r if isinstance(r, GoldenRecord) else GoldenRecord(dict(r[0]), dict(r[1])) for r in records]
    tensors: dict[str, np.ndarray] = {}
    calls = []
    prev: GoldenRecord | None = None
    for i, rec in enumerate(records):
        chained = _state_from(prev, rec, state_pairs)
        skip = {past for past, _ in state_pairs} if chained else set()
        for name, a in rec.inputs.items():
            if name not in skip:
                tensors[f"{i:06d}/in/{name}"] = np.ascontiguousarray(a)
        for name, a in rec.outputs.items():
            tensors[f"{i:06d}/out/{name}"] = np.ascontiguousarray(a)
        calls.append(
            {"phase": rec.phase, "stream": rec.stream, "inputs": list(rec.inputs), "outputs": list(rec.outputs),
             "state_from_previous": chained}
        )  # fmt: skip
        prev = rec
    header = {"format": GOLDEN_FORMAT, "state_pairs": [list(p) for p in state_pairs], "info": dict(info or {}), "calls": calls}
    path = Path(path)
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    return path


def _state_from(prev: GoldenRecord | None, rec: GoldenRecord, pairs: Sequence[tuple[str, str]]) -> bool:
    """Are all of ``rec``'s state inputs its stream predecessor's present outputs?"""
    if prev is None or rec.stream is None or rec.stream != prev.stream or not pairs:
        return False
    return all(
        past in rec.inputs and present in prev.outputs and np.array_equal(rec.inputs[past], prev.outputs[present])
        for past, present in pairs
    )


def load_golden(path: str | Path) -> Golden:
    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"{path} not found; record it with save_golden or record_golden first")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        header = json.loads(meta[HEADER_KEY])
    except Exception as e:  # noqa: BLE001  (safetensors raises its own types; any failure reads the same)
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise GoldenError(f"{path} is not a readable golden file ({reason}); record it again") from None
    if header.get("format") != GOLDEN_FORMAT:
        raise GoldenError(f"{path} has golden format {header.get('format')}, this edgeseq reads {GOLDEN_FORMAT}")
    pairs = tuple((a, b) for a, b in header["state_pairs"])
    records: list[GoldenRecord] = []
    for i, call in enumerate(header["calls"]):
        inputs = {}
        for name in call["inputs"]:
            key = f"{i:06d}/in/{name}"
            inputs[name] = tensors[key] if key in tensors else records[-1].outputs[dict(pairs)[name]]
        outputs = {name: tensors[f"{i:06d}/out/{name}"] for name in call["outputs"]}
        records.append(GoldenRecord(inputs, outputs, call["phase"], call["stream"]))
    return Golden(records, pairs, header["info"])


def record_golden(
    reference: Runner,
    io: GraphIO,
    *,
    prompts: Sequence[np.ndarray] | None = None,
    steps: int = DECODE_STEPS // 4,
    seed: int = 0,
    info: Mapping | None = None,
) -> Golden:
    """Run the reference alone as ``compare`` would (prompts, then a decode stream of
    ``steps``) and keep every call. Long streams are left to live comparison: a golden
    of thousands of steps stores thousands of states."""
    prompts = random_prompts(io, seed=seed) if prompts is None else [as_tokens(p) for p in prompts]
    records: list[GoldenRecord] = []
    stream = 0

    def keep(calls: list[Record], phase: str, stream_id: int | None) -> None:
        records.extend(GoldenRecord(dict(x), dict(y), phase, stream_id) for x, y in calls)

    for prompt in prompts:
        calls: list[Record] = []
        if takes_whole_prompt(io, prompt.shape[1]):
            feeds = {token_input(io): prompt, **zero_state(io, prompt.shape[0])}
            run_calls(reference, None, [feeds], record=calls)
            keep(calls, "prefill", None)
        else:
            run_stream(reference, None, io, prompt.shape[1], tokens=prompt, record=calls)
            keep(calls, "prefill", stream)
            stream += 1
    if steps:
        calls = []
        first = np.random.default_rng(seed).integers(0, vocab_size(io), size=(1, 1), dtype=np.int64)
        run_stream(reference, None, io, steps, tokens=first, record=calls)
        keep(calls, "decode", stream)
    meta = {"reference": describe_runner(reference), "io": io.to_dict(), "seed": seed, **dict(info or {})}
    return Golden(records, tuple(io.state_pairs), meta)


def compare_golden(
    candidate: Runner,
    golden: Golden | str | Path,
    *,
    tolerance: Tolerance | str = "fp32",
    feed_back: bool = True,
    prefill_candidate: Runner | None = None,
    state_rel_l2: float | None = None,
) -> CompareResult:
    """Replay a golden file's inputs through the candidate, comparing every output.

    feed_back: within a stream, the candidate gets its own previous present state (drift
    accumulates as it would in deployment); False replays the reference's recorded state,
    isolating each step's error. prefill_candidate takes the "prefill" calls when the
    prompts went through a separate graph.
    """
    source = str(golden) if isinstance(golden, (str, Path)) else None
    golden = load_golden(golden) if source is not None else golden
    precision, tol = resolve_tolerance(tolerance)
    comparisons: dict[str, Comparison] = {}
    prev_out: dict[str, np.ndarray] | None = None
    prev_stream = None
    for rec in golden.records:
        comparison = comparisons.setdefault(rec.phase, Comparison(rec.phase, list(rec.outputs)))
        if not comparison.comparable:
            continue
        feeds = dict(rec.inputs)
        if feed_back and rec.stream is not None and rec.stream == prev_stream and prev_out is not None:
            feeds.update({past: prev_out[present] for past, present in golden.state_pairs})
        runner = prefill_candidate if rec.phase == "prefill" and prefill_candidate is not None else candidate
        out = infer_arrays(runner, feeds)
        ok = comparison.add(rec.outputs, out)
        prev_out, prev_stream = (out, rec.stream) if ok else (None, None)
    reference = dict(golden.info.get("reference") or {"name": "golden", "type": "golden", "device": "unknown"})
    result = CompareResult(
        precision,
        tol,
        reference,
        describe_runner(candidate),
        settings={"golden": source, "feed_back": feed_back, "records": len(golden.records), "state_rel_l2": state_rel_l2},
    )
    for phase, comparison in comparisons.items():
        result.phases[phase] = comparison.result(tol, state_rel_l2=state_rel_l2)
    return result
