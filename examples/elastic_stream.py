"""Streaming from an elastic bundle: the width follows a latency budget the app can change.

    edgeseq export --elastic --target x86 -o out/elastic
    python examples/elastic_stream.py out/elastic "def " --tokens 300 --budget-ms 2 --tight-ms 0.5 --tight-at 150

A ``LatencyBudget`` controller sees each step's wall time and names the next step's width;
``set_width`` switches without reloading. Halfway the app tightens the budget (say the
device went on battery) and the stream narrows; a looser budget would widen it again.
"""

import argparse
import sys
import time

import numpy as np

from edgeseq.runtimes.elastic import LatencyBudget, StepStats
from edgeseq.runtimes.session import StreamingSession


def stream(bundle: str, prompt: str, tokens: int, budget_ms: float, tight_ms: float, tight_at: int,
           clock=time.perf_counter, log=None):  # fmt: skip
    """Yield text pieces; ``log`` (a list) receives (token, old width, new width) per switch."""
    with StreamingSession.from_bundle(bundle) as session:
        control = LatencyBudget(session.widths.labels, budget_ms)
        decoder = session.tokenizer.stream_decoder(after=session.tokenizer.prompt_ids(prompt))
        logits = session.prefill_text(prompt)
        for t in range(1, tokens + 1):
            token = int(np.argmax(logits))
            yield decoder.step(token)
            start = clock()
            logits = session.step(token)
            if t == tight_at:
                control.budget_ms = tight_ms  # the app's own reason: battery, heat, a shared accelerator
            width = control.on_step(StepStats(t, session.width, (clock() - start) * 1e3))
            if width != session.width:
                if log is not None:
                    log.append((t, session.width, width))
                replayed = session.set_width(width, widen="replay")
                logits = logits if replayed is None else replayed
        yield decoder.flush()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Stream from an elastic bundle under a latency budget.")
    ap.add_argument("bundle")
    ap.add_argument("prompt")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--budget-ms", type=float, default=2.0)
    ap.add_argument("--tight-ms", type=float, default=0.5)
    ap.add_argument("--tight-at", type=int, default=150)
    args = ap.parse_args()
    switches = []
    sys.stdout.write(args.prompt)
    for piece in stream(args.bundle, args.prompt, args.tokens, args.budget_ms, args.tight_ms, args.tight_at,
                        log=switches):  # fmt: skip
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    for t, old, new in switches:
        print(f"-- token {t}: width {old} -> {new}", file=sys.stderr)
