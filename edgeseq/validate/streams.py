"""Driving runners call by call: what they are fed, independent calls, decode streams.

``run_stream`` drives a reference and a candidate (and an fp64 step oracle) one decode
step at a time, each side feeding back its own state (``edgeseq.validate.compare`` draws
it); ``run_verified_stream`` drives the same stream with an oracle that takes a chunk of
tokens per call, so fp64 costs a few calls per stream instead of one per step:

    chunk of K steps from saved states (S_ref, S_cand, comparison):
      reference + candidate, step by step: t_i forced, else the reference's argmax (a draft)
      oracle, one call on t_0..t_{K-1} from its own state     --> fp64 logits [K, V]
      first i whose draft != argmax(fp64_i)?
        none:  keep the K steps; next token argmax(fp64_{K-1})
        i:     restore the saved states, run t_0..t_i again, next token argmax(fp64_i)

The tokens are then the fp64 model's greedy choice, exactly as ``run_stream`` with a step
oracle picks them (the chunked fp64 logits match the stepped ones to ~1e-13), and every
call of both sides is compared once. A runner is anything with
``infer(dict[str, np.ndarray]) -> dict``, already active: life cycles stay with the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Protocol, TypeVar

import numpy as np

from edgeseq.errors import UsageError
from edgeseq.export.spec import ATTENTION_MASK, BATCH, GraphIO
from edgeseq.validate.results import LOGITS, Comparison

PROMPT_LENGTHS = (1, 7, 33)
T = TypeVar("T")

Feeds = dict[str, np.ndarray]
Record = tuple[Feeds, dict[str, np.ndarray]]  # (inputs, outputs) of one reference call


class Runner(Protocol):
    def infer(self, feeds: Feeds) -> Mapping[str, np.ndarray]: ...


# --- what the runners are fed ---------------------------------------------------------


def token_input(io: GraphIO) -> str:
    """The one input that is neither state nor a prefill's mask: ``input_ids``."""
    state = {p for p, _ in io.state_pairs}
    rest = [t.name for t in io.inputs if t.name not in state and t.name != ATTENTION_MASK]
    if len(rest) != 1:
        raise UsageError(f"expected one token input besides the state, found {rest}")
    return rest[0]


def token_feeds(io: GraphIO, tokens: np.ndarray) -> Feeds:
    """The feeds besides the state: ``tokens`` [B, T] and, where the graph takes one (a
    prefill graph), an all-ones ``attention_mask`` (validation feeds unpadded prompts)."""
    feeds = {token_input(io): tokens}
    if any(t.name == ATTENTION_MASK for t in io.inputs):
        feeds[ATTENTION_MASK] = np.ones(tokens.shape, np.int64)
    return feeds


def zero_state(io: GraphIO, batch: int = 1) -> Feeds:
    """Zeros for every state input (``past.*``, ``position``), batch axis set to ``batch``."""
    specs = {t.name: t for t in io.inputs}
    state = {}
    for name, _ in io.state_pairs:
        shape = tuple(batch if d == BATCH else d for d in specs[name].shape)
        if any(isinstance(d, str) for d in shape):
            raise UsageError(f"state input {name} has a dynamic axis besides batch: {specs[name].shape}")
        state[name] = np.zeros(shape, dtype=specs[name].dtype)
    return state


def vocab_size(io: GraphIO, logits: str = LOGITS) -> int:
    (spec,) = [t for t in io.outputs if t.name == logits]
    if not isinstance(spec.shape[-1], int):
        raise UsageError(f"{logits} has a dynamic vocabulary axis; pass prompts and tokens explicitly")
    return spec.shape[-1]


def random_prompts(io: GraphIO, lengths: Sequence[int] = PROMPT_LENGTHS, seed: int = 0) -> list[np.ndarray]:
    """One [1, T] int64 prompt of uniform random tokens per length."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size(io), size=(1, n), dtype=np.int64) for n in lengths]


def takes_whole_prompt(io: GraphIO, length: int) -> bool:
    (spec,) = [t for t in io.inputs if t.name == token_input(io)]
    axis = spec.shape[1]
    if isinstance(axis, str) or axis == length:
        return True
    if axis == 1:
        return False
    raise UsageError(f"a prompt of {length} tokens fits neither this graph's {axis} tokens per call nor a step")


def as_tokens(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens[None, :] if tokens.ndim == 1 else tokens  # [T] -> [1, T]


# --- driving runners ------------------------------------------------------------------


def infer_arrays(runner: Runner, feeds: Feeds) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in runner.infer(dict(feeds)).items()}


def run_calls(
    reference: Runner,
    candidate: Runner | None,
    feeds: Iterable[Feeds],
    comparison: Comparison | None = None,
    record: list[Record] | None = None,
) -> int:
    """Independent calls, the same feeds to both sides; stops at an uncomparable call.
    ``candidate=None`` only runs (and records) the reference. Returns the calls made."""
    calls = 0
    for feed in feeds:
        ref = infer_arrays(reference, feed)
        calls += 1
        if record is not None:
            record.append((dict(feed), ref))
        if candidate is None or comparison is None:
            continue
        own = {k: np.array(v) for k, v in feed.items()}  # no buffer shared between sides
        if not comparison.add(ref, infer_arrays(candidate, own)):
            break
    return calls


def run_stream(
    reference: Runner,
    candidate: Runner | None,
    io: GraphIO,
    steps: int,
    comparison: Comparison | None = None,
    *,
    tokens: np.ndarray | None = None,
    state: Feeds | None = None,
    record: list[Record] | None = None,
    oracle: Runner | None = None,
) -> int:
    """``steps`` decode calls; each side feeds back its own state (diagram above).

    tokens: [B, N] int64 forced for the first N steps (N may be < steps); afterwards, and
    when None (then the first token is 0), the argmax of the oracle's logits when there is
    an oracle, else of the reference's. state: the starting state of every side, zeros by
    default; the oracle gets it in the dtypes its ``io`` declares (float64). oracle: the
    fp64 model, run beside both sides; its outputs go to ``comparison.add``. Returns the
    calls made.
    """
    tokens = np.zeros((1, 1), np.int64) if tokens is None else as_tokens(tokens)
    ref_state = dict(state) if state is not None else zero_state(io, tokens.shape[0])
    cand_state = {k: v.copy() for k, v in ref_state.items()}  # no buffer shared between sides
    fp64_state = in_dtypes_of(oracle, ref_state) if oracle is not None else {}
    token = np.ascontiguousarray(tokens[:, :1])
    for step in range(steps):
        fp64 = None
        if oracle is not None:
            fp64 = infer_arrays(oracle, {**token_feeds(io, token.copy()), **fp64_state})
            fp64_state = {past: fp64[present] for past, present in io.state_pairs}
        feeds = {**token_feeds(io, token), **ref_state}
        ref = infer_arrays(reference, feeds)
        if record is not None:
            record.append((feeds, ref))
        if candidate is not None and comparison is not None:
            cand = infer_arrays(candidate, {**token_feeds(io, token.copy()), **cand_state})
            if not comparison.add(ref, cand, oracle=fp64):
                return step + 1
            cand_state = {past: cand[present] for past, present in io.state_pairs}
        ref_state = {past: ref[present] for past, present in io.state_pairs}
        if step + 1 < tokens.shape[1]:
            token = np.ascontiguousarray(tokens[:, step + 1 : step + 2])
        else:
            logits = (fp64 if fp64 is not None else ref)[LOGITS]
            last = logits[:, -1] if logits.ndim == 3 else logits  # [B, T, V] -> [B, V]
            token = np.argmax(last, axis=-1).astype(np.int64)[:, None]
    return steps


def last_call(runner: Runner, io: GraphIO, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs of ``runner``'s last step after it took ``tokens`` [B, T] one by one from
    the zero state, feeding back its own state (only the latest state is held: a 1000-token
    prompt through a large model's step graph would otherwise keep 1000 states)."""
    tokens = as_tokens(tokens)
    state, out = zero_state(io, tokens.shape[0]), {}
    for t in range(tokens.shape[1]):
        out = infer_arrays(runner, {**token_feeds(io, np.ascontiguousarray(tokens[:, t : t + 1])), **state})
        state = {past: out[present] for past, present in io.state_pairs}
    return out


def in_dtypes_of(runner: Runner, state: Feeds) -> Feeds:
    """Copies of ``state`` in the dtypes ``runner.io`` declares for them (the fp64 oracle
    keeps a float64 state); as they are for a runner without an ``io``."""
    io = getattr(runner, "io", None)
    dtypes = {t.name: t.dtype for t in io.inputs} if io is not None else {}
    return {k: v.astype(dtypes.get(k, v.dtype)) for k, v in state.items()}  # astype copies


# --- a stream whose fp64 oracle takes chunks ------------------------------------------


def takes_chunks(runner: Runner) -> bool:
    """Does ``runner`` take several tokens per call and return every position's logits
    (a prefill runner with all logits, e.g. ``TorchRunner(model, "prefill", all_logits=True)``)?"""
    io = getattr(runner, "io", None)
    if io is None:
        return False
    (ids,) = [t for t in io.inputs if t.name == token_input(io)]
    (logits,) = [t for t in io.outputs if t.name == LOGITS]
    return ids.shape[1] != 1 and len(logits.shape) == 3


def run_verified_stream(
    reference: Runner,
    candidates: Sequence[Runner],
    io: GraphIO,
    steps: int,
    comparisons: Sequence[Comparison],
    *,
    tokens: np.ndarray | None = None,
    oracle: Runner,
    chunk: int = 64,
) -> int:
    """``run_stream`` with an fp64 ``oracle`` that takes chunks (``takes_chunks``), drafted
    by the reference and verified chunk by chunk (module docstring), for every candidate at
    once (one comparison each): the reference and the oracle run once per call whatever
    the number of candidates. The same calls are compared and the same distances from fp64
    recorded as ``run_stream`` would, candidate by candidate; a candidate whose call cannot
    be compared leaves the stream there. Returns the steps the reference ran."""
    tokens = np.zeros((1, 1), np.int64) if tokens is None else as_tokens(tokens)
    sides = Lockstep(reference, candidates, io, comparisons, zero_state(io, tokens.shape[0]))
    fp64_state = in_dtypes_of(oracle, sides.ref)
    token, done = np.ascontiguousarray(tokens[:, :1]), 0
    while done < steps and sides.active:
        saved = sides.save()
        used = sides.run(token, min(chunk, steps - done), tokens[:, done:])
        fp64 = infer_arrays(oracle, {**token_feeds(oracle.io, used), **fp64_state})
        picks = np.argmax(fp64[LOGITS], axis=-1).astype(np.int64)  # [B, n]: fp64's choice after each step
        wrong = [i for i in range(used.shape[1] - 1) if done + i + 1 >= tokens.shape[1]
                 and not np.array_equal(sides.drafts[:, i], picks[:, i])]  # fmt: skip
        if wrong:  # the reference's draft left fp64's path: take back the steps after it
            sides.restore(saved)
            used = sides.run(token, wrong[0] + 1, used[:, : wrong[0] + 1])
            fp64 = infer_arrays(oracle, {**token_feeds(oracle.io, used), **fp64_state})
            picks = np.argmax(fp64[LOGITS], axis=-1).astype(np.int64)
        for i, (ref_logits, cand_logits) in enumerate(sides.logits):
            for comparison, logits in cand_logits.items():
                comparison.add_oracle({LOGITS: ref_logits}, {LOGITS: logits}, {LOGITS: fp64[LOGITS][:, i]})
        fp64_state = {past: fp64[present] for past, present in io.state_pairs}
        done += used.shape[1]
        forced = done < tokens.shape[1]
        token = np.ascontiguousarray(tokens[:, done : done + 1] if forced else picks[:, -1:])
    return done


def run_lockstep_stream(reference: Runner, candidates: Sequence[Runner], io: GraphIO, steps: int,
                        comparisons: Sequence[Comparison], *, tokens: np.ndarray | None = None) -> int:  # fmt: skip
    """``run_stream`` without an oracle for every candidate at once: the reference runs
    once per step, its argmax picks the token after ``tokens``. Returns the steps it ran."""
    tokens = np.zeros((1, 1), np.int64) if tokens is None else as_tokens(tokens)
    sides = Lockstep(reference, candidates, io, comparisons, zero_state(io, tokens.shape[0]), keep_logits=False)
    return sides.run(np.ascontiguousarray(tokens[:, :1]), steps, tokens).shape[1]


class Lockstep:
    """The reference and any number of candidates through the same decode steps, each
    feeding back its own state, every call of every candidate compared with the
    reference's; ``save``/``restore`` take a chunk of steps back. A candidate whose call
    cannot be compared (``Comparison.add`` says so) leaves; the rest go on."""

    def __init__(self, reference: Runner, candidates: Sequence[Runner], io: GraphIO,
                 comparisons: Sequence[Comparison], state: Feeds, keep_logits: bool = True):  # fmt: skip
        self.reference, self.io, self.keep_logits = reference, io, keep_logits
        self.ref = state
        # per candidate: [runner, its comparison, its state]; no buffer shared between sides
        self.sides = [[c, comp, {k: v.copy() for k, v in state.items()}] for c, comp in zip(candidates, comparisons)]
        self.logits: list[tuple[np.ndarray, dict[Comparison, np.ndarray]]] = []
        self.drafts = np.zeros((next(iter(state.values())).shape[0] if state else 1, 0), np.int64)

    @property
    def active(self) -> bool:
        return any(comp.comparable for _, comp, _ in self.sides)

    def save(self) -> tuple:
        return self.ref, [(state, comp.snapshot()) for _, comp, state in self.sides]

    def restore(self, saved: tuple) -> None:
        self.ref = saved[0]
        for side, (state, snapshot) in zip(self.sides, saved[1]):
            side[1].restore(snapshot)
            side[2] = state

    def run(self, token: np.ndarray, n: int, given: np.ndarray) -> np.ndarray:
        """``n`` steps from ``token`` (fewer once no candidate is left); the token after
        step i is ``given[:, i + 1]`` where given, else the reference's argmax (kept as
        ``drafts``). Returns the tokens fed, [B, n']."""
        fed, drafts, self.logits = [], [], []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for i in range(n):
                if not self.active:
                    break
                fed.append(token)
                drafts.append(self._step(pool, token))
                token = np.ascontiguousarray(given[:, i + 1 : i + 2]) if i + 1 < given.shape[1] else drafts[-1]
        self.drafts = np.concatenate(drafts, axis=1) if drafts else self.drafts[:, :0]
        return np.concatenate(fed, axis=1) if fed else np.zeros((self.drafts.shape[0], 0), np.int64)

    def _step(self, pool: ThreadPoolExecutor, token: np.ndarray) -> np.ndarray:
        """One step of every side still comparable; returns the reference's argmax [B, 1]."""
        pairs = self.io.state_pairs
        sides = [side for side in self.sides if side[1].comparable]
        outs = beside(pool, partial(infer_arrays, self.reference, {**token_feeds(self.io, token), **self.ref}),
                      [partial(infer_arrays, r, {**token_feeds(self.io, token.copy()), **state})
                       for r, _, state in sides])  # fmt: skip
        ref, theirs = outs[0], {}
        for side, out in zip(sides, outs[1:]):
            if side[1].add(ref, out):
                side[2] = {past: out[present] for past, present in pairs}
                theirs[side[1]] = out[LOGITS]
        self.ref = {past: ref[present] for past, present in pairs}
        if self.keep_logits:
            self.logits.append((ref[LOGITS], theirs))
        last = ref[LOGITS][:, -1] if ref[LOGITS].ndim == 3 else ref[LOGITS]  # [B, T, V] -> [B, V]
        return np.argmax(last, axis=-1).astype(np.int64)[:, None]


def beside(pool: ThreadPoolExecutor, first: Callable[[], T], others: Sequence[Callable[[], T]]) -> list[T]:
    """``[first(), *(o() for o in others)]``, ``others`` on ``pool``'s thread while ``first``
    runs on this one: the reference (PyTorch) and the candidates (onnxruntime, which lets
    go of the GIL while it runs) use two cores instead of taking turns."""
    later = pool.submit(lambda: [o() for o in others])
    return [first(), *later.result()]
