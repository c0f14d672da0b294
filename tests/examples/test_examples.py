"""The embedding examples run as an app would run them: the onnxruntime-genai loop and the
StreamingSession loop stream the same greedy text from one bundle, and the chat loop's
prefix cache changes nothing but the time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edgeseq.deploy.pipeline import ExportRequest, export_bundle
from edgeseq.width import WidthSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples") / "bundle"
    export_bundle(ExportRequest("hybrid-tiny", "x86-64-cpu", WidthSpec.parse("1/2"), out, flavor="portable",
                                validate=False))  # fmt: skip
    return out


def test_genai_and_session_loops_stream_the_same_text(bundle):
    pytest.importorskip("onnxruntime_genai")
    prompt = ["The state ", "def main(", "Über "][np.random.default_rng().integers(3)]
    theirs = "".join(_load("genai_stream").stream(str(bundle), prompt, 150, greedy=True))
    ours = "".join(_load("session_stream").stream(str(bundle), prompt, 150, greedy=True))
    assert len(theirs) > 50 and theirs == ours, (prompt, theirs, ours)


def test_chat_turns_with_a_cached_system_prompt_match_a_cold_start(bundle):
    from edgeseq.runtimes.session import StreamingSession

    example = _load("session_stream")
    system = "You are a terse assistant. " * int(np.random.default_rng().integers(2, 6))
    turns = ["Hello.", "What is a state?"]
    got = list(example.chat_turns(str(bundle), system, turns, 40))
    with StreamingSession.from_bundle(bundle) as session:
        for turn, text in got:
            session.reset()
            logits = session.prefill(session.tokenizer.prompt_ids(system) + session.tokenizer.encode(turn))
            out = []
            for _ in range(40):
                out.append(int(logits.argmax()))
                logits = session.step(out[-1])
            assert text == session.tokenizer.decode(out), turn


def test_elastic_stream_narrows_when_the_app_tightens_its_budget(tmp_path, monkeypatch):
    """A fake clock: a step costs 3 ms at width 1, 1.5 at 1/2, 0.8 at 1/4, 0.4 at 1/8."""
    from edgeseq.runtimes.session import StreamingSession

    out = tmp_path / "elastic"
    export_bundle(ExportRequest("hybrid-tiny", "x86-64-cpu", None, out, flavor="portable", validate=False, elastic=()))
    cost, now = {"1": 3.0, "0.5": 1.5, "0.25": 0.8, "0.125": 0.4}, [0.0]
    step = StreamingSession.step

    def timed(self, token):
        now[0] += cost[self.width] / 1e3
        return step(self, token)

    monkeypatch.setattr(StreamingSession, "step", timed)
    tight_at = int(np.random.default_rng().integers(40, 80))
    log = []
    text = "".join(_load("elastic_stream").stream(str(out), "def ", 160, 4.0, 1.0, tight_at, lambda: now[0], log))
    assert len(text) > 40
    assert [(old, new) for _, old, new in log] == [("1", "0.5"), ("0.5", "0.25")], log
    assert log[0][0] == tight_at  # a stream that has settled narrows at once
