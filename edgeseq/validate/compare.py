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

Given an fp64 oracle that takes chunks (``compare_each``), the reference's own distance
from fp64 on the prompts (``reference_rounding``) and on the decode stream raises those
phases' limits to what rounding at the model's size explains
(``export.spec.Tolerance.beside_rounding``): absolute fp32 limits set on models of a few
million weights would fail a correct 130M graph.

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
life cycles stay with the caller. How runners are driven (feeds, streams, the chunked fp64
oracle, several candidates in lockstep) lives in ``edgeseq.validate.streams``;
``compare_each`` judges several candidates beside one reference run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgeseq.export.spec import GraphIO, Tolerance
from edgeseq.validate.metrics import abs_error
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
from edgeseq.validate.streams import (  # noqa: F401  (re-exported, as above)
    PROMPT_LENGTHS,
    Feeds,
    Record,
    Runner,
    as_tokens,
    in_dtypes_of,
    infer_arrays,
    last_call,
    random_prompts,
    run_calls,
    run_lockstep_stream,
    run_stream,
    run_verified_stream,
    takes_chunks,
    takes_whole_prompt,
    token_feeds,
    token_input,
    vocab_size,
    zero_state,
)

DECODE_STEPS = 256
LONG_STEPS = 4096

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
        stepped = last_call(step, step_io, prompt)
        whole = infer_arrays(prefill, {**token_feeds(prefill_io, prompt), **zero_state(prefill_io, prompt.shape[0])})
        if not comparison.add(stepped, whole):
            break
    return comparison.result(tol.handoff())


def reference_rounding(reference: Runner, oracle: Runner, io: GraphIO, prompts: Sequence[np.ndarray]) -> tuple[float, float]:
    """How far the reference's prefill of each prompt (from the zero state, taken whole)
    sits from the fp64 ``oracle``'s (``takes_chunks``): (max abs distance of the last
    logits, largest relative L2 distance of a state), over all prompts."""
    logit = state = 0.0
    for prompt in map(as_tokens, prompts):
        if not takes_whole_prompt(io, prompt.shape[1]):
            continue
        zeros = zero_state(io, prompt.shape[0])
        ref = infer_arrays(reference, {**token_feeds(io, prompt), **zeros})
        fp64 = infer_arrays(oracle, {**token_feeds(oracle.io, prompt), **in_dtypes_of(oracle, zeros)})  # type: ignore[attr-defined]
        last = [x[:, -1] if x.ndim == 3 else x for x in (ref[LOGITS], fp64[LOGITS])]
        logit = max(logit, float(abs_error(last[1], last[0]).max(initial=0.0)))
        for _, present in io.state_pairs:
            exact = fp64[present].astype(np.float64)
            norm = float(np.linalg.norm(exact))
            if norm > 0:
                state = max(state, float(np.linalg.norm(ref[present].astype(np.float64) - exact)) / norm)
    return logit, state


def _rounding(reference: Runner, oracle: Runner | None, io: GraphIO, prompts: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """``reference_rounding`` where an oracle that takes chunks is given, else None."""
    if not prompts or oracle is None or not takes_chunks(oracle):
        return None
    return reference_rounding(reference, oracle, io, prompts)


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
    both sides on the same tokens (its greedy choice after ``tokens``); a prefill runner
    with all logits (``takes_chunks``) takes the stream a chunk per call
    (``run_verified_stream``), a step runner a step per call. Each side feeds
    back its own state. The result's ``oracle_drift`` then holds, per step, the max abs
    logit distance of the candidate and of the reference from fp64, and the drift check
    is ``export.spec.drift_within`` on their maxima instead of ``tolerance.drift`` on the
    candidate-vs-reference error (for the precisions that judge drift; others report).
    """
    phase = "long_stream"
    return _compare_stream(reference, candidate, io, steps, tolerance, tokens, seed, phase, state_rel_l2, oracle)


def _first_tokens(io: GraphIO, tokens: np.ndarray | None, seed: int) -> np.ndarray:
    """``tokens``, else one drawn from ``seed``: where a stream starts."""
    if tokens is not None:
        return tokens
    return np.random.default_rng(seed).integers(0, vocab_size(io), size=(1, 1), dtype=np.int64)


def _compare_stream(reference: Runner, candidate: Runner, io: GraphIO, steps: int, tolerance: Tolerance | str,
                    tokens: np.ndarray | None, seed: int, phase: str, state_rel_l2: float | None,
                    oracle: Runner | None = None) -> PhaseResult:  # fmt: skip
    _, tol = resolve_tolerance(tolerance)
    tokens = _first_tokens(io, tokens, seed)
    comparison = Comparison(phase, _names(io))
    if oracle is not None and takes_chunks(oracle):
        run_verified_stream(reference, [candidate], io, steps, [comparison], tokens=tokens, oracle=oracle)
    else:
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
    rounding: tuple[float, float] | None = None,
) -> CompareResult:
    """Every phase: prefill on ``prompts`` (random ones from ``seed`` when None; () skips
    it; with separate prefill graphs also the handoff from prefill to step graph),
    ``steps`` decode steps and a ``long_steps`` stream (0 skips either); both
    streams start with ``tokens`` ([B, N]) when given, else a token drawn from ``seed``,
    and go on with the reference's argmax (the oracle's on the long stream, given one).

    io: the graph's I/O, by default ``reference.io``. prefill: (reference, candidate, io)
    of separate prefill graphs; by default the same runners take the prompts, whole or
    token by token. oracle: the step model in fp64, which judges the long stream's drift
    (``compare_long_stream``); one that takes chunks also measures the reference's distance
    from fp64 on the prompts (``reference_rounding``, unless ``rounding`` gives it), which
    raises the prefill and handoff limits (``Tolerance.beside_rounding``).
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
        rounding = rounding or _rounding(pre_ref, oracle, pre_io, prompts)
        pre_tol = tol if rounding is None else tol.beside_rounding(*rounding)
        result.settings["rounding"] = None if rounding is None else {"logit": rounding[0], "state": rounding[1]}
        result.phases["prefill"] = compare_prefill(
            pre_ref, pre_cand, pre_io, prompts, tolerance=pre_tol, state_rel_l2=state_rel_l2
        )
        if prefill is not None and pre_cand is not candidate:
            result.phases["handoff"] = compare_handoff(pre_cand, candidate, pre_io, io, prompts, tolerance=pre_tol)
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


def compare_each(
    reference: Runner,
    candidates: Sequence[Runner],
    io: GraphIO | None = None,
    *,
    tolerance: Tolerance | str = "fp32",
    prompts: Sequence[np.ndarray] | None = None,
    steps: int = DECODE_STEPS,
    long_steps: int = LONG_STEPS,
    seed: int = 0,
    tokens: np.ndarray | None = None,
    prefill: tuple[Runner, Sequence[Runner], GraphIO] | None = None,
    state_rel_l2: float | None = None,
    reference_device: str | None = None,
    oracle: Runner | None = None,
) -> list[CompareResult]:
    """``compare`` for several candidates of one reference (a bundle's flavors), one result
    each, as ``compare`` gives it: prompts and handoff candidate by candidate, both streams
    in lockstep (``streams.Lockstep``), so that the reference, and the oracle, run once per
    step for all of them. prefill: (reference, one candidate per candidate, io). An
    oracle that takes steps only (not ``takes_chunks``) runs each candidate with ``compare``."""
    io = io if io is not None else reference.io  # type: ignore[attr-defined]
    _, tol = resolve_tolerance(tolerance)
    by_one = oracle is not None and long_steps and not takes_chunks(oracle)
    pre_ref, pre_io = (prefill[0], prefill[2]) if prefill else (reference, io)
    prompts = random_prompts(pre_io, seed=seed) if prompts is None else [as_tokens(p) for p in prompts]
    rounding = _rounding(pre_ref, oracle, pre_io, prompts)  # once for all candidates

    def one(i: int) -> CompareResult:
        own = None if prefill is None else (prefill[0], prefill[1][i], prefill[2])
        result = compare(reference, candidates[i], io, tolerance=tolerance, prompts=prompts,
                         steps=steps if by_one else 0, long_steps=long_steps if by_one else 0, seed=seed,
                         tokens=tokens, prefill=own, state_rel_l2=state_rel_l2,
                         reference_device=reference_device, oracle=oracle, rounding=rounding)  # fmt: skip
        result.settings |= {"steps": steps, "long_steps": long_steps}
        return result

    # prompts and handoff, one thread per candidate: a handoff feeds long prompts token by token
    with ThreadPoolExecutor(max_workers=max(1, len(candidates))) as pool:
        results = list(pool.map(one, range(len(candidates))))
    if by_one:
        return results
    for phase, n, start in (("decode", steps, seed), ("long_stream", long_steps, seed + 1)):
        if not n:
            continue
        comparisons = [Comparison(phase, _names(io)) for _ in candidates]
        first = _first_tokens(io, tokens, start)
        if oracle is not None:  # both streams follow fp64's greedy choice; decode's limits rise by its rounding
            run_verified_stream(reference, candidates, io, n, comparisons, tokens=first, oracle=oracle)
        else:
            run_lockstep_stream(reference, candidates, io, n, comparisons, tokens=first)
        for result, comparison in zip(results, comparisons):
            result.phases[phase] = comparison.result(tol, state_rel_l2=state_rel_l2)
    return results


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
