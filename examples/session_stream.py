"""The same streaming loop over edgeseq's own StreamingSession (onnxruntime, no PyTorch).

    python examples/session_stream.py BUNDLE "The state of" --tokens 200

Beyond onnxruntime-genai's loop it shows what the session adds: a snapshot to roll back
to, and a prefix cache so that a repeated system prompt is not prefilled again.
"""

import argparse
import sys

from edgeseq.runtimes.prefix_cache import PrefixCache
from edgeseq.runtimes.session import StreamingSession


def stream(bundle: str, prompt: str, tokens: int, greedy: bool = False):
    with StreamingSession.from_bundle(bundle) as session:
        yield from session.generate(prompt, tokens, temperature=0 if greedy else 0.8, top_k=40)


def chat_turns(bundle: str, system: str, turns: list[str], tokens: int):
    """Each turn after the same system prompt: its state comes from the cache after the first."""
    cache = PrefixCache(max_bytes=64 << 20)
    with StreamingSession.from_bundle(bundle) as session:
        system_ids = session.tokenizer.prompt_ids(system)
        for turn in turns:
            session.reset()
            session.prefill(system_ids, cache=cache)  # cached after the first turn
            logits = session.prefill(session.tokenizer.encode(turn))
            out = []
            for _ in range(tokens):
                out.append(int(logits.argmax()))
                logits = session.step(out[-1])
            yield turn, session.tokenizer.decode(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Stream text from a bundle with edgeseq's StreamingSession.")
    ap.add_argument("bundle")
    ap.add_argument("prompt")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--greedy", action="store_true")
    args = ap.parse_args()
    sys.stdout.write(args.prompt)
    for piece in stream(args.bundle, args.prompt, args.tokens, args.greedy):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
