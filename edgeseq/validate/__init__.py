"""Validation of exported graphs against the PyTorch reference, call by call.

    metrics   per-output error statistics (numpy only)
    results   Comparison (accumulates over calls), typed failures, PhaseResult, CompareResult
    compare   drives any two runners: prefill, decode with state fed back, the long stream
              (its drift judged against an fp64 oracle when one is given); compare_each
              drives one reference beside several candidates (a bundle's flavors)
    streams   what runners are fed, and the streams: step by step, in lockstep, and with
              an fp64 oracle that takes a chunk per call (run_verified_stream)
    drift     OracleDrift: the long stream's distances from fp64 and the drift rule's verdict
    golden    reference calls saved as safetensors, compared later without torch
    report    JSON report, rich table, drift PNG

Nothing here imports torch: golden files can be checked on a device that lacks it.
"""

from edgeseq.validate.compare import (
    DECODE_STEPS,
    LONG_STEPS,
    compare,
    compare_decode,
    compare_handoff,
    compare_long_stream,
    compare_prefill,
    run_calls,
    run_stream,
    zero_state,
)
from edgeseq.validate.drift import OracleDrift
from edgeseq.validate.golden import (
    Golden,
    GoldenRecord,
    compare_golden,
    load_golden,
    record_golden,
    save_golden,
)
from edgeseq.validate.metrics import ErrorAccumulator, OutputStats, output_stats
from edgeseq.validate.report import load_report, plot_drift, print_report, write_report
from edgeseq.validate.results import (
    CompareResult,
    Comparison,
    DriftExceeded,
    Failure,
    MissingOutput,
    NonFinite,
    PhaseResult,
    ShapeMismatch,
    ToleranceExceeded,
)

__all__ = [
    "DECODE_STEPS",
    "LONG_STEPS",
    "CompareResult",
    "Comparison",
    "DriftExceeded",
    "ErrorAccumulator",
    "Failure",
    "Golden",
    "GoldenRecord",
    "MissingOutput",
    "NonFinite",
    "OracleDrift",
    "OutputStats",
    "PhaseResult",
    "ShapeMismatch",
    "ToleranceExceeded",
    "compare",
    "compare_decode",
    "compare_golden",
    "compare_handoff",
    "compare_long_stream",
    "compare_prefill",
    "load_golden",
    "load_report",
    "output_stats",
    "plot_drift",
    "print_report",
    "record_golden",
    "run_calls",
    "run_stream",
    "save_golden",
    "write_report",
    "zero_state",
]
