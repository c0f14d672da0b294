"""StreamingSession: the app-facing decode loop over any runner. Torch-free.

    session = StreamingSession.from_bundle("out/bundle")      # a bundle, on onnxruntime
    session = StreamingSession(step_runner, prefill_runner)   # or runners already active
    logits = session.prefill(prompt_ids)                      # [V]
    logits = session.step(next_token)                         # [V]
    blob = session.save_state()                               # safetensors bytes
    session.load_state(blob)                                  # resume exactly there
    snap = session.snapshot(); session.restore(snap)          # in-memory rollback / branching
    other = session.fork()                                    # same runners, its own state
    logits = session.prefill(prompt_ids, cache=PrefixCache(64 << 20))  # reuse a cached prefix
    for piece in session.generate("def ", 100):               # text in, text out (batch 1)
        print(piece, end="")

Text goes through ``session.tokenizer`` (``edgeseq.tokenizer``): the bundle's own
``tokenizer.json`` when it carries one, else bytes. ``prefill_text`` feeds a prompt's
text; ``generate_ids`` samples ids from there (up to an EOS), ``generate`` decodes them
as they come, never splitting a UTF-8 character.

The session holds the state as the step graph's inputs (``past.*`` and, with attention,
``position``) and after every call feeds each ``present.*`` output back into the input
it pairs with (``GraphIO.state_pairs``). It always counts the tokens consumed, also for
Mamba2-only graphs that have no ``position`` input; the count is saved with the state.

With ``batch=B`` the session runs B streams in lockstep: prefill takes [B, T] ids, step
takes B tokens, and both return [B, V] logits. Token ids are checked against the
vocabulary before a runner sees them. Every error it raises is an ``EdgeseqError``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import safetensors
import safetensors.numpy

from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import GraphIO
from edgeseq.runtimes.base import FeedError, GraphIOError, Runner
from edgeseq.tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from edgeseq.runtimes.prefix_cache import PrefixCache

POSITION = "position"


class StateError(EdgeseqError):
    """Saved state bytes do not fit this session's graph."""


class SessionError(EdgeseqError):
    """A session was built from something it cannot stream with."""


@dataclass(frozen=True)
class Snapshot:
    """A copy of a session's state: the state inputs by name and the tokens consumed ([B])."""

    state: dict[str, np.ndarray]
    position: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot holds (the session's ``state_bytes`` plus 8 per stream)."""
        return sum(a.nbytes for a in self.state.values()) + self.position.nbytes


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """One token id from logits [V]: greedy at temperature 0, else from the ``top_k`` most likely."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def _check_runner(role: str, runner: object) -> None:
    if isinstance(runner, (str, os.PathLike)):
        raise SessionError(f"StreamingSession takes runners, not a path; open a bundle with "
                           f"StreamingSession.from_bundle({os.fspath(runner)!r})")  # fmt: skip
    if not (hasattr(runner, "infer") and hasattr(runner, "io")):
        raise SessionError(f"{role} is a {type(runner).__name__}, not a runner (edgeseq.runtimes.Runner); "
                           "open a bundle with StreamingSession.from_bundle(path)")  # fmt: skip


class StreamingSession:
    def __init__(
        self, step_runner: Runner, prefill_runner: Runner | None = None, io: GraphIO | None = None, batch: int = 1
    ):
        _check_runner("step_runner", step_runner)
        if prefill_runner is not None:
            _check_runner("prefill_runner", prefill_runner)
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise SessionError(f"batch must be a whole number of streams, at least 1 (got {batch!r})")
        self.step_runner, self.prefill_runner = step_runner, prefill_runner
        self.io = io or step_runner.io
        self.batch = int(batch)
        self.flavor: str | None = None  # the bundle's graph flavor, when opened with from_bundle
        self.tokenizer: Tokenizer = ByteTokenizer()  # from_bundle: the bundle's own
        logits = next((t for t in self.io.outputs if t.name == "logits"), None)
        # token ids run from 0 to vocab_size - 1 (None: the graph does not fix the vocabulary)
        self.vocab_size = logits.shape[-1] if logits is not None and isinstance(logits.shape[-1], int) else None
        self._state_specs = {t.name: t for t in self.io.inputs if t.name != "input_ids"}
        self._pairs = dict(self.io.state_pairs)  # input name -> output name
        unpaired = sorted(self._state_specs.keys() - self._pairs.keys())
        if unpaired:
            raise GraphIOError(
                f"step graph inputs {unpaired} have no present.* output to feed them; re-export the graph"
            )
        if prefill_runner is not None:
            theirs = {t.name for t in prefill_runner.io.inputs if t.name != "input_ids"}
            if theirs != self._state_specs.keys():
                raise GraphIOError("the prefill and step graphs carry different state; export both from one model")
        self.reset()

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, flavor: str | None = None, batch: int = 1,
                    threads: int | None = None) -> StreamingSession:  # fmt: skip
        """A session over a bundle's step and prefill graphs, active and ready to decode.

        The manifest is read with every file's sha256 checked (``edgeseq.deploy.bundle``);
        ``flavor`` defaults to the first of the bundle's flavors that a runtime installed
        here streams (``edgeseq.deploy.runtimes``), placed on the execution providers and
        threads of the bundle's target profile (``threads`` overrides them; 0: all cores).
        ``close()`` (or ``with``) frees the runtime's sessions."""
        from edgeseq.deploy.bundle import read_manifest
        from edgeseq.deploy.runtimes import Placement, open_runner, streamed_flavor

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise SessionError(f"threads must be 0 (all cores) or more (got {threads!r})")
        root = Path(path)
        manifest = read_manifest(root)
        flavor = streamed_flavor(manifest, flavor)
        placement = Placement.of_target(manifest.get("target", {}), threads)
        step, prefill = (open_runner(root, manifest, flavor, kind, placement) for kind in ("step", "prefill"))
        try:
            step.activate()
            prefill.activate()
            session = cls(step, prefill, batch=batch)
        except BaseException:
            step.deactivate()
            prefill.deactivate()
            raise
        session.flavor = flavor
        if TOKENIZER_FILE in manifest.get("files", {}):  # checked against its sha256 above; else bytes
            session.tokenizer = load_tokenizer(root)
        return session

    def close(self) -> None:
        """Free the runners' backends (the session cannot decode afterwards)."""
        for runner in (self.step_runner, self.prefill_runner):
            if runner is not None:
                runner.deactivate()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state ------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a fresh stream: every state tensor zero, position 0."""
        self._state = {name: np.zeros(self._shape(spec.shape), spec.dtype) for name, spec in self._state_specs.items()}
        self._position = np.zeros(self.batch, np.int64)

    @property
    def position(self) -> int | np.ndarray:
        """Tokens consumed so far (an int; a [B] array with batch > 1)."""
        return int(self._position[0]) if self.batch == 1 else self._position.copy()

    def save_state(self) -> bytes:
        """The stream's state as safetensors bytes: the state inputs by name, plus ``position``."""
        tensors = {**self._state, POSITION: self._position}
        # safetensors (0.8) writes a strided array's raw buffer, not its elements: make each contiguous
        return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})

    def load_state(self, data: bytes) -> None:
        """Resume from ``save_state`` bytes; raise StateError (and keep the current state)
        unless they hold exactly this graph's state names, shapes and dtypes."""
        try:
            tensors = safetensors.numpy.load(bytes(data))
        except (safetensors.SafetensorError, TypeError, ValueError, KeyError) as e:  # damaged or foreign bytes
            raise StateError(f"state bytes are not a saved session state ({type(e).__name__}: {e})") from None
        want = {
            **{n: (self._shape(s.shape), s.dtype) for n, s in self._state_specs.items()},
            POSITION: ((self.batch,), "int64"),
        }
        missing, unknown = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want.keys())
        if missing or unknown:
            raise StateError(f"saved state does not fit this graph: missing {missing}, unexpected {unknown}")
        for name, (shape, dtype) in want.items():
            t = tensors[name]
            if t.shape != shape or t.dtype != np.dtype(dtype):
                raise StateError(f"saved {name!r} is {t.dtype}{list(t.shape)}; this session wants {dtype}{list(shape)}")
        self._position = tensors.pop(POSITION)
        self._state = tensors if POSITION not in self._state_specs else {**tensors, POSITION: self._position.copy()}

    @property
    def state_bytes(self) -> int:
        """Bytes of state for all streams (the sum of the state arrays): what a snapshot or a fork costs.
        The state's shapes are the graph's (fixed at export), so this does not grow with position."""
        return sum(a.nbytes for a in self._state.values())

    def snapshot(self) -> Snapshot:
        """A copy of the state now (``state_bytes`` + 8 bytes per stream of memory); ``restore`` returns here."""
        return Snapshot({k: v.copy() for k, v in self._state.items()}, self._position.copy())

    def restore(self, snapshot: Snapshot) -> None:
        """Go back to ``snapshot``: the next logits are bit-identical to those at snapshot time.
        The snapshot stays usable (the session takes copies)."""
        if not isinstance(snapshot, Snapshot):
            raise StateError(f"restore takes a session.snapshot(), not a {type(snapshot).__name__}")
        want = {n: self._shape(s.shape) for n, s in self._state_specs.items()}
        got = {n: a.shape for n, a in snapshot.state.items()}
        if got != want or snapshot.position.shape != (self.batch,):
            raise StateError("the snapshot is from a session of another graph or batch; restore it there")
        self._state = {k: v.copy() for k, v in snapshot.state.items()}
        self._position = snapshot.position.copy()

    def fork(self) -> StreamingSession:
        """A new session on the same runners (no new backend session) with a copy of this state,
        independent afterwards; costs ``state_bytes`` of memory. Closing either closes the runners
        they share, so close only the last one."""
        other = copy.copy(self)
        other.restore(self.snapshot())
        return other

    # -- decoding ---------------------------------------------------------------------

    def prefill(self, ids: Sequence[int] | np.ndarray, cache: PrefixCache | None = None) -> np.ndarray:
        """Consume a prompt (T ids, or [B, T]); logits after its last token, [V] or [B, V].
        Runs the prefill graph once if there is one, else the step graph T times.

        With ``cache`` (a ``PrefixCache``, batch 1) the prompt is a whole stream from position 0:
        the session restores the longest cached prefix of ``ids`` and prefills only the rest."""
        if cache is not None:
            return cache.prefill(self, ids)
        ids = self._ids(ids)
        if ids.shape[1] == 0:
            raise FeedError("prefill needs at least one token")
        if self.prefill_runner is None:
            for t in range(ids.shape[1]):
                logits = self._run(self.step_runner, ids[:, t : t + 1])
        else:
            logits = self._run(self.prefill_runner, ids)
        return logits[0] if self.batch == 1 else logits

    def step(self, token: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Consume one token per stream; logits [V] (or [B, V])."""
        logits = self._run(self.step_runner, self._ids(np.reshape(np.asarray(token), (-1, 1))))
        return logits[0] if self.batch == 1 else logits

    # -- text -------------------------------------------------------------------------

    def prefill_text(self, text: str) -> np.ndarray:
        """Consume a prompt's text (its ``tokenizer.prompt_ids``, BOS first where the
        tokenizer adds one); logits [V]. One stream only."""
        if self.batch != 1:
            raise SessionError("prefill_text feeds one stream; tokenize for a batch and call prefill([B, T] ids)")
        self.tokenizer.check_vocab(self.vocab_size)
        return self.prefill(self.tokenizer.prompt_ids(text))

    def generate_ids(self, prompt: str, n: int, temperature: float = 0.8, top_k: int = 40,
                     seed: int | None = None) -> Iterator[int]:  # fmt: skip
        """Prefill ``prompt`` and yield up to ``n`` sampled ids; stops at the tokenizer's EOS."""
        rng = np.random.default_rng(seed)
        logits = self.prefill_text(prompt)
        for _ in range(n):
            token = sample(logits, temperature, top_k, rng)
            if token in self.tokenizer.eos_ids:
                return
            yield token
            logits = self.step(token)

    def generate(self, prompt: str, n: int, temperature: float = 0.8, top_k: int = 40,
                 seed: int | None = None) -> Iterator[str]:  # fmt: skip
        """``generate_ids`` decoded as it goes: text pieces, none splitting a character."""
        decoder = self.tokenizer.stream_decoder(after=self.tokenizer.prompt_ids(prompt))
        for token in self.generate_ids(prompt, n, temperature, top_k, seed):
            if piece := decoder.step(token):
                yield piece
        if rest := decoder.flush():
            yield rest

    def _run(self, runner: Runner, ids: np.ndarray) -> np.ndarray:
        out = runner.infer({"input_ids": ids, **self._state})
        self._state = {name: out[self._pairs[name]] for name in self._state_specs}
        # the graph counts position when it has one; Mamba2-only graphs do not, so count here
        self._position = self._state[POSITION].copy() if POSITION in self._state else self._position + ids.shape[1]
        logits = out["logits"]  # [B, V], or [B, T, V] from a graph exported with all_logits
        return logits[:, -1] if logits.ndim == 3 else logits

    def _ids(self, ids) -> np.ndarray:
        """Token ids as int64 [B, T], checked: integers, one row per stream, in the vocabulary."""
        try:
            ids = np.asarray(ids)
        except ValueError:  # ragged rows
            raise FeedError("token ids are ragged; give every stream the same number of tokens") from None
        if ids.size and ids.dtype.kind not in "iu":
            raise FeedError(f"token ids must be integers, not {ids.dtype}")
        ids = ids.astype(np.int64)
        ids = ids[None] if ids.ndim == 1 and self.batch == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise FeedError(f"token ids of shape {ids.shape} do not fit {self.batch} stream(s); pass [T] or [B, T]")
        vocab = self.vocab_size
        if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = ids[(ids < 0) | (ids >= vocab)][0]
            raise FeedError(f"token id {bad} is out of range; this model takes ids 0 to {vocab - 1}")
        return ids

    def _shape(self, shape: tuple[int | str, ...]) -> tuple[int, ...]:
        """A state spec's shape for this session: its one named (dynamic) axis is the batch."""
        return tuple(self.batch if isinstance(d, str) else d for d in shape)
