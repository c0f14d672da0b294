"""What a comparison leaves behind: a JSON report, a rich table, a PNG of the drift.

The JSON report is the audit record: runners and their devices, precision, the tolerance
used and which of its checks each phase judged, per-output statistics of every phase,
the per-call max abs logit error series, pass/fail and the failures; where an fp64 oracle
ran beside the long stream, the phase's ``oracle_drift`` adds the per-call distances from
fp64 of the candidate and of the reference, their maxima and ratio, the drift rule with its
constants, and its verdict. Non-finite numbers are written as the strings "inf", "-inf",
"nan" so the file stays strict JSON.
``bpb_delta`` is recorded with the tolerance but judged by the evaluation, not here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeseq.atomic import atomic_file
from edgeseq.errors import EdgeseqError
from edgeseq.validate.results import CompareResult

REPORT_FORMAT = "edgeseq.validate.report/1"
# Readable in 80 columns: a rule under the header, no edges, one space between columns.
TABLE = {"box": box.SIMPLE_HEAD, "collapse_padding": True, "pad_edge": False, "show_edge": False}


class ReportError(EdgeseqError):
    """A report cannot be written or read."""


def report_dict(
    result: CompareResult | Mapping, *, reference_device: str | None = None, extra: Mapping | None = None
) -> dict:
    """The JSON-ready report of a result (or an already loaded report, returned as is)."""
    if not isinstance(result, CompareResult):
        return dict(result)
    from edgeseq import __version__

    body = result.to_dict()
    if reference_device is not None:
        body["runners"]["reference"]["device"] = reference_device
    head = {
        "format": REPORT_FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": {"edgeseq": __version__, "python": platform.python_version(), "numpy": np.__version__,
                        "machine": platform.machine(), "system": platform.system()},
    }  # fmt: skip
    return _strict({**head, **body, "extra": dict(extra or {})})


def _strict(x: object) -> object:
    """Non-finite floats as strings, tuples as lists, numpy scalars as Python numbers."""
    if isinstance(x, Mapping):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_report(result: CompareResult | Mapping, path: str | Path, **kwargs) -> Path:
    """Write the JSON report atomically; kwargs go to ``report_dict``."""
    text = json.dumps(report_dict(result, **kwargs), indent=1, allow_nan=False)
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def load_report(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read the report {path} ({type(e).__name__}); run the validation again") from None
    if report.get("format") != REPORT_FORMAT:
        raise ReportError(f"{path} is not an edgeseq validation report ({REPORT_FORMAT})")
    return report


def _fmt(x: object, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _one_minus(cosine: float | str) -> float | str:
    return 1.0 - cosine if isinstance(cosine, float) else cosine  # "nan" stays as written


def print_report(result: CompareResult | Mapping, console: Console | None = None) -> None:
    """A table per phase of every output, then the failures, one line each."""
    report = report_dict(result)
    console = console or Console()
    ref, cand = report["runners"]["reference"], report["runners"]["candidate"]
    verdict = "[green]PASS[/]" if report["passed"] else "[red]FAIL[/]"
    console.print(
        f"{verdict} {escape(ref['name'])} ({escape(str(ref['device']))}) vs {escape(cand['name'])} "
        f"({escape(str(cand['device']))}), precision {report['precision'] or 'custom'}"
    )
    tol = ", ".join(f"{k} {v}" for k, v in report["tolerance"].items())
    console.print(f"tolerance: {escape(tol)}")
    for phase, body in report["phases"].items():
        failing = {f["output"] for f in body["failures"]}
        console.print(f"[bold]{phase}[/]: {_calls(report, phase, body)}, judged on {', '.join(body['checks']) or 'nothing'}",
                      highlight=False)  # fmt: skip
        table = Table("output", "max abs", "rel L2", "1-cos", "top-1", "KL", "", **TABLE)
        table.columns[0].no_wrap = True
        for name, s in body["outputs"].items():
            status = "[red]FAIL[/]" if name in failing else "[green]ok[/]"
            table.add_row(
                escape(name), _fmt(s["max_abs"]), _fmt(s["rel_l2"]), _fmt(_one_minus(s["cosine"])),
                _fmt(s["top1_agreement"], 4), _fmt(s["kl"]), status,
            )  # fmt: skip
        console.print(table)
        if "oracle_drift" in body:
            console.print(_oracle_line(body["oracle_drift"], report["runners"].get("oracle")))
    for f in report["failures"]:
        console.print(f"[red]x[/] {escape(f['message'])}")


def _calls(report: Mapping, phase: str, body: Mapping) -> str:
    """How many calls a phase made: "256 calls", or for a golden replay that kept a
    stream's logits at some of its calls only, "4096 calls (256 compared)"."""
    run = (report.get("settings") or {}).get("calls_run", {}).get(phase)
    return f"{run} calls ({body['calls']} compared)" if run and run != body["calls"] else f"{body['calls']} calls"


def _oracle_line(d: Mapping, oracle: Mapping | None) -> str:
    """One line: both distances from fp64, their ratio, the rule and its verdict."""
    who = f" ({escape(oracle['name'])}, {escape(str(oracle['device']))})" if oracle else ""
    if not d["judged"]:
        verdict = "reported, not judged"
    else:
        verdict = "[green]within[/]" if d["within"] else "[red]past[/]"
    return (
        f"vs fp64{who}: candidate {_fmt(d['candidate_max'], 3)}, fp32 reference {_fmt(d['reference_max'], 3)}, "
        f"ratio {_fmt(d['ratio'], 3)}; rule {escape(d['rule']['text'])} = {_fmt(d['limit'], 3)}: {verdict}"
    )


def plot_drift(
    result: CompareResult | Mapping, path: str | Path, *, phase: str = "long_stream", output: str = "logits"
) -> Path:
    """PNG of the per-step max abs error of ``output`` over ``phase``, log y, with the
    limit it is judged against; written atomically. Exact zeros sit on a floor line.
    Where the phase ran beside an fp64 oracle, the logits' distances from fp64 of the
    candidate and of the reference are drawn too, with the drift rule's limit."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("plotting needs matplotlib; pip install 'edgeseq[export]'") from None
    report = report_dict(result)
    if phase not in report["phases"] or output not in report["phases"][phase]["series"]:
        raise ReportError(f"the report has no {phase}/{output} series to plot; run the {phase} phase")
    body = report["phases"][phase]
    lines = {f"max |candidate - reference| ({output})": body["series"][output]}
    fp64 = body.get("oracle_drift") if output == "logits" else None
    if fp64 is not None:
        lines |= {"max |candidate - fp64|": fp64["candidate"], "max |fp32 reference - fp64|": fp64["reference"]}
    lines = {label: np.array([_number(v) for v in s], dtype=np.float64) for label, s in lines.items()}
    limit_name = "drift" if phase == "long_stream" else "max_abs_logit"
    limit = report["tolerance"][limit_name]
    limit_label = f"{limit_name} limit {limit:g}" if limit is not None else ""
    if fp64 is not None:  # the rule's limit, on |candidate - fp64|, replaces the tolerance's where it judges
        limit = _number(fp64["limit"]) if fp64["judged"] else None
        rule, value = fp64["rule"], _number(fp64["limit"])
        limit_label = (
            f"limit on |candidate - fp64|: max({rule['ratio']:g} x reference, {rule['floor']:g}) = {value:.3g}"
        )
    every = np.concatenate(list(lines.values()))
    positive = every[(every > 0) & np.isfinite(every)]
    floor = float(positive.min()) / 10 if positive.size else (limit or 1.0) * 1e-6

    fig = Figure(figsize=(8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = (report.get("settings") or {}).get("series_steps", {}).get(phase)  # a golden replay's kept calls
    for label, series in lines.items():
        shown = np.where(np.isnan(series), np.inf, np.maximum(series, floor))
        x = np.asarray(steps) if steps is not None and len(steps) == series.size else np.arange(series.size)
        ax.plot(x, np.minimum(shown, 1e30), lw=0.8, label=label)
    if limit is not None:  # quantized precisions are judged on top-1, KL and bits per byte instead
        ax.axhline(limit, color="tab:red", ls="--", lw=1, label=limit_label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max abs error")
    ref, cand = report["runners"]["reference"]["name"], report["runners"]["candidate"]["name"]
    oracle = report["runners"].get("oracle") if fp64 is not None else None
    oracle = f", fp64: {oracle['name']}" if oracle else ""
    ax.set_title(f"{phase}: {cand} vs {ref} ({report['precision'] or 'custom'}{oracle})", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _number(v: object) -> float:
    return float(v)  # float("inf"), float("nan") read the strict-JSON strings back
