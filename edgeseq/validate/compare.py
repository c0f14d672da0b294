"""Drive two runners (and, on the long stream, an fp64 oracle) through the same inputs and
compare every output at every call.

    prefill      each prompt from the zero state: one call when the graph takes the whole
                 prompt, else token by token with the state fed back; the last logits and
                 every state handed on are judged
    handoff      given separate prefill graphs: the candidate's prefill graph against the
                 candidate's own step graph fed each prompt token by token (the state a
                 prompt leaves must not depend on which graph took it)
    decode       N steps from the zero state, every output compared at every step
    long_stream  one decode stream of LONG_STEPS steps, judged on drift: against the fp64
                 oracle when one is given (``export.spec.drift_within``), else against
                 the reference

One decode step i, the state fed back per ``GraphIO.state_pairs``:

    t_i --+--> reference.infer(input_ids=t_i, past.* = ref present.*(i-1))   --> ref_i  --+
          +--> candidate.infer(input_ids=t_i, past.* = cand present.*(i-1))  --> cand_i --+--> Comparison.add
          +--> oracle.infer(input_ids=t_i, past.* = fp64 present.*(i-1))     --> fp64_i --+   (given an oracle)
    t_{i+1} = given token, else argmax(fp64_i.logits) given an oracle, else argmax(ref_i.logits)

Each side feeds back its own present state (that is what measures drift) while all see
the same tokens. With an oracle the tokens are the fp64 model's own greedy choice: the
stream is then the model's, not the device's (a CPU and a CUDA reference break
near-ties differently), so a candidate's distance from fp64 is measured on the same
stream whichever reference validates it, reports from different machines compare, and
neither fp32 side steers the stream it is judged on.
A runner is anything with ``infer(dict[str, np.ndarray]) -> dict``, already active:
life cycles stay with the caller.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from edgeseq.errors import UsageError
from edgeseq.export.spec import ATTENTION_MASK, BATCH, GraphIO, Tolerance
from edgeseq.validate.results import (  # noqa: F401  (re-exported: one import site for users)
    LOGITS,
    PHASE_CHECKS,
    CompareResult,
    Comparison,
    Failure,
    MissingOutput,
    NonFinite,
    PhaseResult,
    ShapeMismatch,
    ToleranceExceeded,
    UnknownPrecisionError,
    resolve_tolerance,
)

DECODE_STEPS = 256
LONG_STEPS = 4096
PROMPT_LENGTHS = (1, 7, 33)

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
    fp64_state = _in_dtypes_of(oracle, ref_state) if oracle is not None else {}
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


def _in_dtypes_of(runner: Runner, state: Feeds) -> Feeds:
    """Copies of ``state`` in the dtypes ``runner.io`` declares for them (the fp64 oracle
    keeps a float64 state); as they are for a runner without an ``io``."""
    io = getattr(runner, "io", None)
    dtypes = {t.name: t.dtype for t in io.inputs} if io is not None else {}
    return {k: v.astype(dtypes.get(k, v.dtype)) for k, v in state.items()}  # astype copies


# --- the phases -----------------------------------------------------------------------


def _names(io: GraphIO) -> list[str]:
    return [t.name for t in io.outputs]


def compare_prefill(
    reference: Runner,
    candidate: Runner,
    io: GraphIO,
    prompts: Sequence[np.ndarray],
    *,
    tolerance: Tolerance | str = "fp32",
    state_rel_l2: float | None = None,
) -> PhaseResult:
    """Each prompt ([T] or [B, T] int64) from the zero state, every output compared."""
    _, tol = resolve_tolerance(tolerance)
    comparison = Comparison("prefill", _names(io))
    for prompt in map(as_tokens, prompts):
        if takes_whole_prompt(io, prompt.shape[1]):
            feeds = {**token_feeds(io, prompt), **zero_state(io, prompt.shape[0])}
            run_calls(reference, candidate, [feeds], comparison)
        else:
            run_stream(reference, candidate, io, prompt.shape[1], comparison, tokens=prompt)
        if not comparison.comparable:
            break
    return comparison.result(tol, state_rel_l2=state_rel_l2)


def compare_handoff(
    prefill: Runner,
    step: Runner,
    prefill_io: GraphIO,
    step_io: GraphIO,
    prompts: Sequence[np.ndarray],
    *,
    tolerance: Tolerance | str = "fp32",
) -> PhaseResult:
    """Each prompt from the zero state through ``prefill`` in one call and through ``step``
    token by token; the prefill call's outputs (last logits, every state) are compared with
    the step graph's after the prompt's last token, at ``tolerance.handoff()``: two graphs
    of one bundle, at one precision, should hand decode the same state."""
    _, tol = resolve_tolerance(tolerance)
    comparison = Comparison("handoff", _names(prefill_io))
    for prompt in map(as_tokens, prompts):
        calls: list[Record] = []
        run_stream(step, None, step_io, prompt.shape[1], tokens=prompt, record=calls)
        whole = infer_arrays(prefill, {**token_feeds(prefill_io, prompt), **zero_state(prefill_io, prompt.shape[0])})
        if not comparison.add(calls[-1][1], whole):
            break
    return comparison.result(tol.handoff())


def compare_decode(
    reference: Runner,
    candidate: Runner,
    io: GraphIO,
    steps: int = DECODE_STEPS,
    *,
    tolerance: Tolerance | str = "fp32",
    tokens: np.ndarray | None = None,
    seed: int = 0,
    phase: str = "decode",
    state_rel_l2: float | None = None,
) -> PhaseResult:
    """``steps`` decode steps from the zero state; without ``tokens``, the first token is
    drawn from ``seed`` and the rest follow the reference's argmax."""
    return _compare_stream(reference, candidate, io, steps, tolerance, tokens, seed, phase, state_rel_l2)


def compare_long_stream(
    reference: Runner,
    candidate: Runner,
    io: GraphIO,
    steps: int = LONG_STEPS,
    *,
    tolerance: Tolerance | str = "fp32",
    tokens: np.ndarray | None = None,
    seed: int = 1,
    state_rel_l2: float | None = None,
    oracle: Runner | None = None,
) -> PhaseResult:
    """One long decode stream, judged on drift; ``series["logits"]`` holds the per-step
    max abs logit error of the candidate from the reference.

    oracle: the same model in fp64 (``TorchRunner(model, dtype="float64")``), run beside
    both sides on the same tokens (its greedy choice after ``tokens``), each side feeding
    back its own state. The result's ``oracle_drift`` then holds, per step, the max abs
    logit distance of the candidate and of the reference from fp64, and the drift check
    is ``export.spec.drift_within`` on their maxima instead of ``tolerance.drift`` on the
    candidate-vs-reference error (for the precisions that judge drift; others report).
    """
    phase = "long_stream"
    return _compare_stream(reference, candidate, io, steps, tolerance, tokens, seed, phase, state_rel_l2, oracle)


def _compare_stream(reference: Runner, candidate: Runner, io: GraphIO, steps: int, tolerance: Tolerance | str,
                    tokens: np.ndarray | None, seed: int, phase: str, state_rel_l2: float | None,
                    oracle: Runner | None = None) -> PhaseResult:  # fmt: skip
    _, tol = resolve_tolerance(tolerance)
    if tokens is None:
        tokens = np.random.default_rng(seed).integers(0, vocab_size(io), size=(1, 1), dtype=np.int64)
    comparison = Comparison(phase, _names(io))
    run_stream(reference, candidate, io, steps, comparison, tokens=tokens, oracle=oracle)
    return comparison.result(tol, state_rel_l2=state_rel_l2)


def compare(
    reference: Runner,
    candidate: Runner,
    io: GraphIO | None = None,
    *,
    tolerance: Tolerance | str = "fp32",
    prompts: Sequence[np.ndarray] | None = None,
    steps: int = DECODE_STEPS,
    long_steps: int = LONG_STEPS,
    seed: int = 0,
    tokens: np.ndarray | None = None,
    prefill: tuple[Runner, Runner, GraphIO] | None = None,
    state_rel_l2: float | None = None,
    reference_device: str | None = None,
    oracle: Runner | None = None,
) -> CompareResult:
    """Every phase: prefill on ``prompts`` (random ones from ``seed`` when None; () skips
    it; with separate prefill graphs also the handoff from prefill to step graph),
    ``steps`` decode steps and a ``long_steps`` stream (0 skips either); both
    streams start with ``tokens`` ([B, N]) when given, else a token drawn from ``seed``,
    and go on with the reference's argmax (the oracle's on the long stream, given one).

    io: the graph's I/O, by default ``reference.io``. prefill: (reference, candidate, io)
    of separate prefill graphs; by default the same runners take the prompts, whole or
    token by token. oracle: the step model in fp64, which judges the long stream's drift
    (``compare_long_stream``); the other phases do not run it.
    """
    io = io if io is not None else reference.io  # type: ignore[attr-defined]
    precision, tol = resolve_tolerance(tolerance)
    pre_ref, pre_cand, pre_io = prefill or (reference, candidate, io)
    prompts = random_prompts(pre_io, seed=seed) if prompts is None else [as_tokens(p) for p in prompts]
    result = CompareResult(
        precision,
        tol,
        describe_runner(reference, reference_device),
        describe_runner(candidate),
        oracle=None if oracle is None else describe_runner(oracle),
        settings={
            "prompt_shapes": [list(p.shape) for p in prompts],
            "steps": steps,
            "long_steps": long_steps,
            "seed": seed,
            "tokens": None if tokens is None else as_tokens(tokens).tolist(),
            "state_rel_l2": state_rel_l2,
            "io": io.to_dict(),
        },
    )
    if prompts:
        result.phases["prefill"] = compare_prefill(
            pre_ref, pre_cand, pre_io, prompts, tolerance=tol, state_rel_l2=state_rel_l2
        )
        if prefill is not None and pre_cand is not candidate:
            result.phases["handoff"] = compare_handoff(pre_cand, candidate, pre_io, io, prompts, tolerance=tol)
    if steps:
        result.phases["decode"] = compare_decode(
            reference, candidate, io, steps, tolerance=tol, tokens=tokens, seed=seed, state_rel_l2=state_rel_l2
        )
    if long_steps:
        result.phases["long_stream"] = compare_long_stream(
            reference, candidate, io, long_steps, tolerance=tol, tokens=tokens, seed=seed + 1,
            state_rel_l2=state_rel_l2, oracle=oracle,
        )  # fmt: skip
    return result


# --- who ran ---------------------------------------------------------------------------


def describe_runner(runner: object, device: str | None = None) -> dict:
    """Name, class and device of a runner, for the report."""
    cls = type(runner)
    return {
        "name": getattr(runner, "name", None) or cls.__name__,
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "device": device or runner_device(runner),
    }


def runner_device(runner: object) -> str:
    """``runner.device`` as text ("cpu", "cuda:NVIDIA H100"), else its execution
    providers, else "unknown". Names a CUDA device through torch only when torch is already loaded."""
    device = getattr(runner, "device", None)
    if device is None:
        for attr in ("providers_used", "providers_requested", "providers"):  # onnxruntime runners
            if providers := getattr(runner, attr, None):
                return ",".join(p if isinstance(p, str) else str(p[0]) for p in providers)
        return "unknown"
    text = str(device)
    torch = sys.modules.get("torch")
    if text.startswith("cuda") and torch is not None:
        try:
            index = int(text.split(":")[1]) if ":" in text else torch.cuda.current_device()
            return f"cuda:{torch.cuda.get_device_name(index)}"
        except Exception:  # noqa: BLE001  (a description must never fail the validation)
            return text
    return text
