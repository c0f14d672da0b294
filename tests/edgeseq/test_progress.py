"""Progress per stage: each stage's line carries the seconds it took (the CLI's printer),
timed by ``StageClock``; a warning neither ends nor begins a stage."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console

from edgeseq.cli.deploy_commands import _ProgressPrinter
from edgeseq.deploy.progress import StageClock


class FakeClock:
    def __init__(self):
        self.now = float(np.random.default_rng().uniform(0, 1e6))

    def __call__(self) -> float:
        return self.now


def test_stage_clock_times_each_stage_until_the_next_begins():
    clock = FakeClock()
    stages = StageClock(clock)
    took = np.random.default_rng().uniform(0.01, 100, 3)
    assert stages.begin("export", "portable") is None
    clock.now += took[0]
    ended = stages.begin("validate", "portable")
    assert (ended.name, ended.detail) == ("export", "portable") and abs(ended.seconds - took[0]) < 1e-6
    clock.now += took[1]
    assert abs(stages.end().seconds - took[1]) < 1e-6 and stages.end() is None
    assert abs(stages.total() - took[:2].sum()) < 1e-6


def test_printer_prints_each_stage_with_its_seconds_and_the_total():
    out, clock = io.StringIO(), FakeClock()
    printer = _ProgressPrinter(Console(file=out, width=200))
    printer.clock = StageClock(clock)
    took = np.round(np.random.default_rng().uniform(0.1, 50, 2), 1)
    printer("export", "portable")
    clock.now += took[0]
    printer("warning", "width 0.3 keeps 7/24")  # a message: the export stage goes on
    printer("validate", "portable at fp16")
    counter = printer.calls("portable")
    counter(3, 10)
    clock.now += took[1]
    printer.close()
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["warning", "width", "0.3", "keeps", "7/24"]
    assert lines[1].split() == ["export", "portable", "...", f"{took[0]:.1f}", "s"]
    assert lines[2].split() == ["validate", "portable", "at", "fp16", "...", f"{took[1]:.1f}", "s"]
    assert lines[3].split() == ["total", f"{took.sum():.1f}", "s"]
