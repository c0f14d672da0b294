"""The soak's fp64 reference (``scripts/soak.py``): the bundle's own model in float64,
following the stream block by block through its chunked prefill with the state carried,
in this process (``InlineReference``) or in a child one block ahead (``ChildReference``).
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from edgeseq.data import load_sample
from edgeseq.deploy.bundle import read_manifest
from edgeseq.deploy.validation import reference_model
from edgeseq.state import ModelState

VERIFY_TOLERANCE = 1e-10  # fp64 chunked vs single-step: fp64 rounding only (seen ~1e-13)


class Tokens:
    """The shipped held-out sample, cycled: token t of the stream is sample[t % len]."""

    def __init__(self):
        self.sample = load_sample()

    def at(self, start: int, n: int) -> np.ndarray:
        """[n] int64, the stream's tokens start .. start+n-1."""
        return self.sample[np.arange(start, start + n) % self.sample.size]


@torch.no_grad()
def prefill(model, ids: np.ndarray, state: ModelState | None, chunk: int, out: np.ndarray | None = None):
    """Every position's logits [n, V] over ``ids`` [n], chunk by chunk, carrying ``state``
    (None: zeros); written into ``out`` when given. Returns (logits, state)."""
    out = np.empty((ids.size, model.config.vocab_size), np.float64) if out is None else out
    for i in range(0, ids.size, chunk):
        logits, state = model(torch.from_numpy(ids[i : i + chunk])[None], state)
        out[i : i + chunk] = logits[0].numpy()
    return out, state


@torch.no_grad()
def single_steps(model, ids: np.ndarray) -> np.ndarray:
    """[n, V] logits of the model's step path over ``ids`` from a zero state."""
    state, out = model.init_state(1), []
    for token in torch.from_numpy(ids):
        logits, state = model.step(token[None], state)
        out.append(logits[0].numpy())
    return np.stack(out)


def verify_reference(model64, ids: np.ndarray, chunk: int) -> dict:
    """fp64 chunked prefill against fp64 single steps on ``ids``, at the run's chunk and at
    a quarter of the stream (so that several chunk boundaries are crossed)."""
    stepped = single_steps(model64, ids)
    chunks = sorted({chunk, max(1, ids.size // 4)})
    diff = max(float(np.abs(prefill(model64, ids, None, c)[0] - stepped).max()) for c in chunks)
    return {"steps": int(ids.size), "chunks": chunks, "max_abs": diff, "tolerance": VERIFY_TOLERANCE}


def fp32_context(model32, model64, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Per step, max |fp32 reference - fp64| over ``ids``: the fp32 PyTorch step path (the
    reference of validation's drift rule) against the fp64 model."""
    return np.abs(single_steps(model32, ids) - prefill(model64, ids, None, chunk)[0]).max(axis=1)


def named_state(state: ModelState) -> dict[str, np.ndarray]:
    """fp64 state under the graph's input names (``past.{i}.x``, ``position``), copied."""
    return {
        (k if k == "position" else f"past.{k}"): np.ascontiguousarray(v.numpy()) for k, v in state.to_named().items()
    }


def model_state(model, named: dict[str, np.ndarray] | None) -> ModelState | None:
    """``named_state``'s arrays back as the model's state (None stays None: zeros)."""
    if named is None:
        return None
    return ModelState.from_named(model.config, {k.removeprefix("past."): torch.from_numpy(v) for k, v in named.items()})


class Fp64Stream:
    """The fp64 reference following the stream block by block with its own state."""

    def __init__(self, model64, chunk: int, state: ModelState | None = None):
        self.model64, self.chunk, self.state, self.tokens = model64, chunk, state, Tokens()

    def run(self, start: int, out: np.ndarray) -> float:
        """Logits of stream positions start .. start+len(out)-1 into ``out`` [n, V]; seconds."""
        t0 = time.perf_counter()
        _, self.state = prefill(self.model64, self.tokens.at(start, len(out)), self.state, self.chunk, out)
        return time.perf_counter() - t0

    def named_state(self) -> dict[str, np.ndarray]:
        return named_state(self.state)


class InlineReference:
    """``--inline``: the fp64 reference in this process, after each block of the graph.
    Its allocations then share the process (and its RSS) with the graph's."""

    def __init__(self, model64, block: int, chunk: int, state: dict | None):
        self.fp64 = Fp64Stream(model64, chunk, model_state(model64, state))
        self.buffer = np.empty((block, model64.config.vocab_size), np.float64)

    def block(self, start: int, n: int) -> tuple[np.ndarray, float, float]:
        """fp64 logits [n, V] from ``start`` (valid until the next call), seconds, seconds waited."""
        seconds = self.fp64.run(start, self.buffer[:n])
        return self.buffer[:n], seconds, seconds

    def named_state(self) -> dict[str, np.ndarray]:
        return self.fp64.named_state()

    def close(self) -> None:
        pass


class ChildReference:
    """The fp64 reference in a child process, one block ahead of the graph (the default).

        stream:  graph block k   | compare k (buffer k%2) | graph block k+1 | compare k+1
        child:   fp64 block k -> buffer k%2 | fp64 block k+1 -> buffer (k+1)%2  |  ...

    Two shared buffers: the child fills one while the stream compares the other. The
    reference's allocations stay out of the stream's RSS and its time mostly off the
    stream's wall clock."""

    def __init__(self, root: Path, block: int, chunk: int, threads: int, span: tuple[int, int], state: dict | None):
        ctx = mp.get_context("spawn")  # no fork of a process that runs onnxruntime's and torch's threads
        vocab = read_manifest(root)["config"]["vocab_size"]
        shared = [ctx.RawArray("d", block * vocab) for _ in range(2)]
        self.buffers = [np.frombuffer(raw, np.float64).reshape(block, vocab) for raw in shared]
        self.conn, theirs = ctx.Pipe()
        args = (theirs, shared, str(root), block, chunk, threads, state)
        self.process = ctx.Process(target=serve_fp64, args=args, daemon=True, name="soak-fp64")
        self.process.start()
        self.block_size, self.end, self.slot, self.state = block, span[1], 0, state
        self._ask(span[0])

    def _ask(self, start: int) -> None:
        if start < self.end:
            self.conn.send((start, min(self.block_size, self.end - start), self.slot))

    def block(self, start: int, n: int) -> tuple[np.ndarray, float, float]:
        """fp64 logits [n, V] from ``start`` (valid until the next call), seconds, seconds waited."""
        t0 = time.perf_counter()
        try:
            reply = self.conn.recv()
        except EOFError:
            raise RuntimeError("the fp64 reference process ended unexpectedly") from None
        if reply[0] == "error":
            raise RuntimeError(f"the fp64 reference process failed:\n{reply[1]}")
        _, done, seconds, self.state = reply
        if done != start:
            raise RuntimeError(f"the fp64 reference sent block {done}, the stream is at {start}")
        waited, slot = time.perf_counter() - t0, self.slot
        self.slot = 1 - slot
        self._ask(start + n)
        return self.buffers[slot][:n], seconds, waited

    def named_state(self) -> dict[str, np.ndarray]:
        """The fp64 state after the last block returned."""
        return self.state

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def serve_fp64(conn, shared, root: str, block: int, chunk: int, threads: int, state: dict | None) -> None:
    """``ChildReference``'s process: fp64 blocks on request, into the shared buffers."""
    try:
        torch.set_num_threads(threads)
        model64 = reference_model(Path(root), read_manifest(root), "cpu")[0].double().eval()
        fp64 = Fp64Stream(model64, chunk, model_state(model64, state))
        buffers = [np.frombuffer(raw, np.float64).reshape(block, -1) for raw in shared]
        while (request := conn.recv()) is not None:
            start, n, slot = request
            conn.send(("block", start, fp64.run(start, buffers[slot][:n]), fp64.named_state()))
    except Exception:  # noqa: BLE001 (the stream raises it with this text)
        conn.send(("error", traceback.format_exc()))
