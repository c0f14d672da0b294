"""A bundle through onnxruntime-genai, as an app embedding it runs it. Torch-free.

    tokens, logits = genai_greedy("out/bundle", prompt_ids, 500)

``onnxruntime_genai`` (the ``genai`` extra) loads the bundle directory by its
``genai_config.json`` (``edgeseq.export.genai``) and runs the decoder graph for the prompt
and for every token after it, holding the state itself. Greedy search only: the check
compares token for token with edgeseq's own runner (``edgeseq.deploy.genai_check``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseq.errors import EdgeseqError

INSTALL = "pip install 'edgeseq[genai]'"


class GenaiUnavailableError(EdgeseqError):
    """onnxruntime-genai is not installed, or cannot load the bundle."""


class GenaiRunError(EdgeseqError):
    """onnxruntime-genai loaded the bundle but failed while generating."""


def genai_installed() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def load_genai(bundle: str | os.PathLike):
    """``onnxruntime_genai.Model`` of a bundle directory."""
    if not genai_installed():
        raise GenaiUnavailableError(f"onnxruntime-genai is not installed; {INSTALL}")
    import onnxruntime_genai as og

    try:
        return og.Model(str(bundle))
    except Exception as e:  # noqa: BLE001  og raises a bare RuntimeError/OrtException for every load failure
        raise GenaiUnavailableError(f"onnxruntime-genai cannot load {bundle}: {str(e).splitlines()[0]}") from None


def genai_greedy(bundle, prompt: Sequence[int], n: int, batch_logits: bool = True) -> tuple[list[int], np.ndarray]:
    """The ``n`` tokens onnxruntime-genai picks greedily after ``prompt`` (fewer if it stops at
    an EOS), and the logits [n, V] each was picked from (empty [0, V] without
    ``batch_logits``). ``bundle``: a bundle directory, or a model ``load_genai`` loaded."""
    model = load_genai(bundle) if isinstance(bundle, (str, os.PathLike)) else bundle
    import onnxruntime_genai as og

    tokens, logits = [], []
    try:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + n, batch_size=1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        while len(tokens) < n and not generator.is_done():
            generator.generate_next_token()
            if batch_logits:
                logits.append(np.asarray(generator.get_output("logits"), dtype=np.float32).reshape(-1))
            tokens.append(int(generator.get_next_tokens()[0]))
    except Exception as e:  # noqa: BLE001  og raises bare RuntimeErrors
        raise GenaiRunError(f"onnxruntime-genai failed after {len(tokens)} tokens: {str(e).splitlines()[0]}") from None
    return tokens, np.stack(logits) if logits else np.zeros((0, 0), np.float32)


def context_length(bundle: str | os.PathLike) -> int | None:
    """The longest stream (prompt and generated tokens) the bundle's genai_config.json allows."""
    try:
        return int(json.loads((Path(bundle) / "genai_config.json").read_text())["model"]["context_length"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
