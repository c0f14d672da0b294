"""State dicts as training code saves them, for the families that read ``torch.save`` files.

A pickle is read only through ``torch.load(weights_only=True)``, which refuses any pickle that
would import and call code, so a hostile file is rejected before anything in it runs. What
training scripts wrap around a state dict is undone: a dict that nests it beside the optimizer
and step (``{"model": ..., "optimizer": ..., "step": ...}``) and the prefixes a wrapper module
puts on every key (``module.`` from DistributedDataParallel, ``_orig_mod.`` from torch.compile).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edgeseq.errors import CheckpointError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel's, torch.compile's
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")  # where training scripts nest it


def strip_wrapper_prefixes(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` while every key starts with one (DDP around a compiled
    model saves ``module._orig_mod.backbone...``)."""
    while tensors:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            break
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def load_pickled(path: Path) -> dict[str, Tensor]:
    """The state dict in a ``torch.save`` file, unwrapped from a training checkpoint's dict
    (its keys as saved: ``strip_wrapper_prefixes`` drops a wrapper's prefixes)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it would import {found[1]}" if found else "it is not a plain pickle of tensors"
        raise CheckpointError(
            f"{path} refused unread: {what}; edgeseq never runs pickled code, "
            "so re-download it or convert it to model.safetensors where you trust its source"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}); re-download or re-export it") from None
    return _state_dict(obj, path)


def _state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """``obj`` itself when it is a flat {name: tensor} dict, else the one such dict it holds
    under a STATE_DICT_KEYS key (a training checkpoint beside its optimizer and step)."""

    def flat(d: Any) -> bool:
        return (
            isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())
        )

    if flat(obj):
        return obj
    inner = [k for k in STATE_DICT_KEYS if isinstance(obj, dict) and flat(obj.get(k))]
    if len(inner) == 1:
        return obj[inner[0]]
    found = f"keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    where = f"both {' and '.join(inner)}" if inner else "no flat state dict of tensors"
    raise CheckpointError(
        f"{path} holds {where} ({found}); save model.state_dict() itself, or one state dict under 'model'"
    )
