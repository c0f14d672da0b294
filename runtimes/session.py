"""StreamingSession: the app-facing decode loop over any runner. Torch-free.

    session = StreamingSession.from_bundle("out/bundle")      # a bundle, on onnxruntime
    session = StreamingSession(step_runner, prefill_runner)   # or runners already active
    logits = session.prefill(prompt_ids)                      # [V]
    logits = session.step(next_token)                         # [V]
    logits = session.prefill_batch([ids_a, ids_b])            # batch=2: prompts of any lengths -> [2, V]
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
takes B tokens, and both return [B, V] logits. Prompts of different lengths go through
one prefill call too: ``prefill_batch`` left-pads them and feeds the prefill graph's
``attention_mask`` (1 = a token, 0 = a pad; ``prefill(ids, mask)`` takes one directly). A
pad leaves its stream's state and position as they were, so each stream ends exactly where
its own prompt alone would have left it; an empty prompt leaves its stream untouched.
Without a prefill graph the step graph runs column by column and a padded stream's state
is put back after each pad. Token ids (and masks) are checked before a runner sees them.
Every error it raises is an ``EdgeseqError``.
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
from edgeseq.export.spec import ATTENTION_MASK, INPUT_IDS, GraphIO, token_feeds
from edgeseq.runtimes.base import FeedError, GraphIOError, Runner
from edgeseq.runtimes.elastic import WidthGraphs, Widths
from edgeseq.tokenizer import ByteTokenizer, Tokenizer

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
        self.batch = int(batch)
        self.flavor: str | None = None  # the bundle's graph flavor, when opened with from_bundle
        self.tokenizer: Tokenizer = ByteTokenizer()  # from_bundle: the bundle's own
        self.widths: Widths | None = None  # an elastic bundle's widths (``set_width``)
        self.width: str | None = None  # the width streaming now, when opened with from_bundle
        self._bind(step_runner, prefill_runner, io)
        self.reset()

    def _bind(self, step_runner: Runner, prefill_runner: Runner | None, io: GraphIO | None = None) -> None:
        """Stream through these runners from the next call on (``set_width`` moves the state)."""
        self.step_runner, self.prefill_runner = step_runner, prefill_runner
        self.io = io or step_runner.io
        logits = next((t for t in self.io.outputs if t.name == "logits"), None)
        # token ids run from 0 to vocab_size - 1 (None: the graph does not fix the vocabulary)
        self.vocab_size = logits.shape[-1] if logits is not None and isinstance(logits.shape[-1], int) else None
        self._state_specs = {t.name: t for t in self.io.inputs if t.name not in (INPUT_IDS, ATTENTION_MASK)}
        self._pairs = dict(self.io.state_pairs)  # input name -> output name
        unpaired = sorted(self._state_specs.keys() - self._pairs.keys())
        if unpaired:
            raise GraphIOError(
                f"step graph inputs {unpaired} have no present.* output to feed them; re-export the graph"
            )
        if prefill_runner is not None:
            theirs = {t.name for t in prefill_runner.io.inputs if t.name not in (INPUT_IDS, ATTENTION_MASK)}
            if theirs != self._state_specs.keys():
                raise GraphIOError("the prefill and step graphs carry different state; export both from one model")

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, flavor: str | None = None, batch: int = 1,
                    threads: int | None = None, widths: Sequence[str] | None = None) -> StreamingSession:  # fmt: skip
        """A session over a bundle's step and prefill graphs, active and ready to decode.

        The manifest is read with every file's sha256 checked (``edgeseq.deploy.bundle``);
        ``flavor`` defaults to the first of the bundle's flavors that a runtime installed
        here streams (``edgeseq.deploy.runtimes``), placed on the execution providers and
        threads of the bundle's target profile (``threads`` overrides them; 0: all cores).
        An elastic bundle's widths (``widths``: which of them, None: all) are all opened,
        the widest streaming first; ``set_width`` switches. ``close()`` (or ``with``) frees
        the runtime's sessions."""
        from edgeseq.deploy.bundle import bundle_tokenizer, read_manifest
        from edgeseq.deploy.runtimes import Placement, streamed_flavor

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise SessionError(f"threads must be 0 (all cores) or more (got {threads!r})")
        root = Path(path)
        manifest = read_manifest(root)
        flavor = streamed_flavor(manifest, flavor)
        placement = Placement.of_target(manifest.get("target", {}), threads)
        session = cls.open(root, manifest, flavor, placement, batch, widths)
        session.tokenizer = bundle_tokenizer(root, manifest)
        return session

    @classmethod
    def open(cls, root: Path, manifest: dict, flavor: str, placement, batch: int = 1,
             widths: Sequence[str] | None = None) -> StreamingSession:  # fmt: skip
        """``from_bundle`` with the manifest already read (a bundle being written, say) and a
        ``Placement``; the tokenizer stays bytes."""
        from edgeseq.config import ModelConfig
        from edgeseq.runtimes.elastic import open_widths

        opened = open_widths(root, manifest, flavor, placement, widths)
        try:
            session = cls.of_widths(opened, ModelConfig.from_dict(manifest["config"]), batch)
        except BaseException:
            for member in opened:
                member.step.deactivate()
                member.prefill.deactivate()
            raise
        session.flavor = flavor
        return session

    @classmethod
    def of_widths(cls, members: Sequence[WidthGraphs], config, batch: int = 1) -> StreamingSession:
        """A session over the active runners of one or more widths (widest first, streaming
        first; ``config`` the widest's ``ModelConfig``); with several, ``set_width`` switches."""
        session = cls(members[0].step, members[0].prefill, batch=batch)
        session.width = members[0].label
        if len(members) > 1:
            session.widths = Widths(config, members)
            session._replay_from_here()
        return session

    def set_width(self, width: str, widen: str | None = None) -> np.ndarray | None:
        """Stream at ``width`` (one of ``widths.labels``, or its value: "0.5" for "1/2") from
        the next call on, without reloading: the state moves with the layer kinds' slicing
        maps (``edgeseq.runtimes.elastic``). Widening with ``widen="replay"`` (the default for
        one stream) re-prefills the recent tokens at the new width and returns the logits
        after them; ``widen="zeros"`` (the default for a batch) starts the new heads at zero.
        Otherwise returns None."""
        if self.widths is None:
            raise SessionError("this session streams one width; export an elastic bundle (edgeseq export --elastic)")
        widen = widen or ("replay" if self.batch == 1 else "zeros")
        label = self.widths.label_of(width)
        if label == self.width:
            return None
        moved = self.widths.switch(self._state, self.batch, self.width, label, widen)
        self._bind(moved.member.step, moved.member.prefill)
        self._state, self._spare, self.width = moved.state, None, label
        if moved.position is not None:  # replayed: back where the saved state was
            self._position = moved.position
        return self._prefill(np.asarray([moved.replay], np.int64), None)[0] if moved.replay else None

    def close(self) -> None:
        """Free the runners' backends (the session cannot decode afterwards)."""
        members = self.widths.members.values() if self.widths else ()
        runners = (self.step_runner, self.prefill_runner, *(r for m in members for r in (m.step, m.prefill)))
        for runner in {id(r): r for r in runners if r is not None}.values():
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
        self._spare: dict[str, np.ndarray] | None = None  # where the next call writes the state (``_run``)
        self._replay_from_here()

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
        self._replay_from_here()

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
        self._replay_from_here()

    def _replay_from_here(self) -> None:
        """An elastic session's replay record starts over at a state it did not stream to."""
        if self.widths is not None:
            self.widths.start(self._state, self._position)

    def fork(self) -> StreamingSession:
        """A new session on the same runners (no new backend session) with a copy of this state,
        independent afterwards; costs ``state_bytes`` of memory. Closing either closes the runners
        they share, so close only the last one."""
        other = copy.copy(self)
        other._spare = None  # its own buffers: never the ones this session writes
        other.widths = None if self.widths is None else copy.copy(self.widths)  # its own replay record (restore's)
        other.restore(self.snapshot())
        return other

    # -- decoding ---------------------------------------------------------------------

    def prefill(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None,
                cache: PrefixCache | None = None) -> np.ndarray:  # fmt: skip
        """Consume a prompt (T ids, or [B, T]); logits after its last token, [V] or [B, V].
        Runs the prefill graph once if there is one, else the step graph T times.

        ``mask`` (the shape of ``ids``, None: all ones): 1 = a token, 0 = a left pad, which
        leaves its stream as it was (``prefill_batch`` builds it). With ``cache`` (a
        ``PrefixCache``, batch 1, no mask) the prompt is a whole stream from position 0: the
        session restores the longest cached prefix of ``ids`` and prefills only the rest."""
        if cache is not None:
            if mask is not None:
                raise FeedError("the prefix cache takes whole prompts; pass no mask with cache=")
            return cache.prefill(self, ids)
        ids = self._ids(ids)
        if ids.shape[1] == 0:
            raise FeedError("prefill needs at least one token")
        logits = self._prefill(ids, None if mask is None else self._mask(mask, ids.shape))
        return logits[0] if self.batch == 1 else logits

    def prefill_batch(self, prompts: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        """One prompt per stream, of any lengths, in one prefill call: left-padded (with id 0,
        masked) to the longest; logits [B, V] after each prompt's last token. An empty prompt
        leaves its stream untouched (its row of logits is meaningless)."""
        if len(prompts) != self.batch:
            raise FeedError(f"prefill_batch takes one prompt per stream: {self.batch}, not {len(prompts)}")
        rows = [self._ids(np.asarray(p)[None], batch=1)[0] for p in prompts]
        longest = max(len(r) for r in rows)
        if longest == 0:
            raise FeedError("prefill_batch needs at least one token in some prompt")
        ids, mask = np.zeros((self.batch, longest), np.int64), np.zeros((self.batch, longest), np.int64)
        for b, row in enumerate(rows):
            ids[b, longest - len(row) :], mask[b, longest - len(row) :] = row, 1
        return self._prefill(ids, None if mask.all() else mask)

    def _prefill(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """ids, mask [B, T] -> logits [B, V]; the step graph column by column without a prefill graph."""
        if self.prefill_runner is not None:
            if self.widths is not None and mask is None and self.batch == 1 and ids.shape[1] > self.widths.replay:
                self._run(self.prefill_runner, ids[:, : -self.widths.replay])  # a replay point before the last tokens
                ids = ids[:, -self.widths.replay :]
            return self._run(self.prefill_runner, ids, mask)
        for t in range(ids.shape[1]):
            before = None if mask is None or mask[:, t].all() else self.snapshot()
            logits = self._run(self.step_runner, ids[:, t : t + 1])
            if before is not None:
                self._put_back(before, mask[:, t] == 0)
        return logits

    def _put_back(self, before: Snapshot, streams: np.ndarray) -> None:
        """The streams marked in ``streams`` [B] bool go back to ``before`` (a pad for them)."""

        def keep(new: np.ndarray, old: np.ndarray) -> np.ndarray:
            return np.where(streams.reshape(-1, *[1] * (new.ndim - 1)), old, new)

        self._state = {k: keep(v, before.state[k]) for k, v in self._state.items()}
        self._position = keep(self._position, before.position)

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

    def _run(self, runner: Runner, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """One graph call; the new state is written into the spare buffers (the previous
        state's, once a call has run), so a stream allocates no state per token."""
        spare = self._spare or {n: np.empty_like(a) for n, a in self._state.items()}
        ours = {n: a.flags.writeable and a.flags.c_contiguous and a.flags.owndata for n, a in self._state.items()}
        where = {n: self._state[n] if ours[n] and n in runner.in_place_state else spare[n] for n in self._state_specs}
        out = runner.infer({**token_feeds(runner.io, ids, mask), **self._state},
                           into={self._pairs[name]: where[name] for name in self._state_specs})  # fmt: skip
        old = self._state
        self._state = {name: out[self._pairs[name]] for name in self._state_specs}
        # the previous buffers are the next call's (a buffer updated in place keeps its spare: the
        # spares never alias the state); arrays a caller handed in (load_state's) are never written
        self._spare = {n: spare[n] if old[n] is self._state[n] else old[n] for n in old} if all(ours.values()) else None
        # the graph counts position when it has one; Mamba2-only graphs do not, so count here
        counted = ids.shape[1] if mask is None else mask.sum(1)
        self._position = self._state[POSITION].copy() if POSITION in self._state else self._position + counted
        if self.widths is not None:
            self.widths.record(ids if mask is None else ids[:, mask.all(0).astype(bool)], self._state, self._position)
        logits = out["logits"]  # [B, V], or [B, T, V] from a graph exported with all_logits
        return logits[:, -1] if logits.ndim == 3 else logits

    def _mask(self, mask, shape: tuple[int, int]) -> np.ndarray:
        """An attention mask as int64 [B, T], checked: ids' shape, 0/1, pads only on the left."""
        mask = np.asarray(mask)
        mask = mask[None] if mask.ndim == 1 and self.batch == 1 else mask
        if mask.shape != shape:
            raise FeedError(f"mask of shape {mask.shape} does not fit ids of shape {shape}; give one 0/1 per id")
        if mask.dtype.kind not in "iub" or not np.isin(mask, (0, 1)).all():
            raise FeedError("mask holds 1 for a token and 0 for a pad, nothing else")
        if (np.diff(mask.astype(np.int64), axis=1) < 0).any():
            raise FeedError("mask has a pad after a token; pad on the left (prefill_batch does)")
        return mask.astype(np.int64)

    def _ids(self, ids, batch: int | None = None) -> np.ndarray:
        """Token ids as int64 [B, T], checked: integers, one row per stream, in the vocabulary."""
        try:
            ids = np.asarray(ids)
        except ValueError:  # ragged rows
            raise FeedError("token ids are ragged; give every stream the same number of tokens") from None
        if ids.size and ids.dtype.kind not in "iu":
            raise FeedError(f"token ids must be integers, not {ids.dtype}")
        ids = ids.astype(np.int64)
        batch = self.batch if batch is None else batch
        ids = ids[None] if ids.ndim == 1 and batch == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != batch:
            raise FeedError(f"token ids of shape {ids.shape} do not fit {batch} stream(s); pass [T] or [B, T]")
        vocab = self.vocab_size
        if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = ids[(ids < 0) | (ids >= vocab)][0]
            raise FeedError(f"token id {bad} is out of range; this model takes ids 0 to {vocab - 1}")
        return ids

    def _shape(self, shape: tuple[int | str, ...]) -> tuple[int, ...]:
        """A state spec's shape for this session: its one named (dynamic) axis is the batch."""
        return tuple(self.batch if isinstance(d, str) else d for d in shape)
