"""The I/O contract of exported graphs, declared once per model.

Every graph (step or prefill, any flavor), every runner and the validator speak these
names. A decode loop feeds each ``present.*`` output back into the ``past.*`` input it
pairs with (``STATE_PAIRS``); ``position`` is fed from ``present.position``.

    step:    input_ids [B, 1] int64, past.*, (position [B])  ->  logits [B, V], present.*
    prefill: input_ids [B, T] int64, attention_mask [B, T] int64, past.*, (position [B])
             ->  logits [B, V] or [B, T, V], present.*

``attention_mask`` lets one prefill call take prompts of different lengths, left-padded:
1 = a token of that stream, 0 = a pad (pads only before a row's tokens). A pad leaves the
row's state untouched and is not counted in ``present.position``; the last logits are
those after the row's last token. Feed ones when nothing is padded (``token_feeds``).

State shapes are fixed apart from the batch axis B, so memory is constant over a stream.
Tolerances, per precision, live beside the spec: the validator and the users' CI helper
read them from here, and so does the drift rule (``drift_within``) that judges a long
stream against an fp64 run of the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from edgeseq.config import ModelConfig
from edgeseq.errors import UsageError
from edgeseq.shapes import layer_state_shapes
from edgeseq.width import full

BATCH, SEQ = "batch", "sequence"
INPUT_IDS, ATTENTION_MASK = "input_ids", "attention_mask"

# Model metadata: the state inputs (comma-separated) whose present output a runner may write
# into the input's own buffer. Only a graph piece whose single reader of that input is one
# node that reads each element before it writes it says so (onnxruntime's LinearAttention
# step); the runner then updates the stream's state in place (``runtimes.ort_runner``).
IN_PLACE_KEY = "edgeseq.state_in_place"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: tuple[int | str, ...]  # a str is a named dynamic axis

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state_pairs: tuple[tuple[str, str], ...]  # (input name, output name) fed back each call

    @classmethod
    def from_dict(cls, d: dict) -> GraphIO:
        spec = lambda t: TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
        return cls(tuple(map(spec, d["inputs"])), tuple(map(spec, d["outputs"])), tuple(map(tuple, d["state_pairs"])))

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "state_pairs": [list(p) for p in self.state_pairs],
        }


def state_specs(config: ModelConfig, prefix: str, state_dtype: str = "float32") -> list[TensorSpec]:
    """past.{i}.<name> for every state tensor the layers' kinds declare (Mamba2: conv, ssm;
    attention: key, value), in layer order."""
    specs = []
    for i, width in enumerate(full(config)):
        for kind, shape in layer_state_shapes(config, i, width).items():
            specs.append(TensorSpec(f"{prefix}.{i}.{kind}", state_dtype, (BATCH, *shape)))
    return specs


def graph_io(config: ModelConfig, kind: str, all_logits: bool = False, state_dtype: str = "float32") -> GraphIO:
    """The I/O of the ``kind`` ("step" or "prefill") graph of an extracted model."""
    if kind not in ("step", "prefill"):
        raise UsageError(f"graph kind must be step or prefill, not {kind!r}")
    tokens = 1 if kind == "step" else SEQ
    past, present = state_specs(config, "past", state_dtype), state_specs(config, "present", state_dtype)
    inputs = [TensorSpec(INPUT_IDS, "int64", (BATCH, tokens)), *past]
    if kind == "prefill":  # 1 = a token of that stream, 0 = a left pad (state untouched, position not counted)
        inputs.insert(1, TensorSpec(ATTENTION_MASK, "int64", (BATCH, SEQ)))
    outputs = [TensorSpec("logits", "float32", (BATCH, SEQ, config.vocab_size) if all_logits else (BATCH, config.vocab_size))]
    outputs += present
    pairs = [(p.name, q.name) for p, q in zip(past, present)]
    if config.uses_position():
        inputs.append(TensorSpec("position", "int64", (BATCH,)))
        outputs.append(TensorSpec("present.position", "int64", (BATCH,)))
        pairs.append(("position", "present.position"))
    return GraphIO(tuple(inputs), tuple(outputs), tuple(pairs))


def token_feeds(io: GraphIO, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The feeds besides the state: ``input_ids`` [B, T] and, where the graph takes one (a
    prefill graph), ``attention_mask`` [B, T] (all ones unless given)."""
    feeds = {INPUT_IDS: ids}
    if any(t.name == ATTENTION_MASK for t in io.inputs):
        feeds[ATTENTION_MASK] = np.ones(ids.shape, np.int64) if mask is None else np.asarray(mask, np.int64)
    elif mask is not None and not np.all(mask):
        raise UsageError("this graph takes no attention_mask (a step graph, or one exported before padded "
                         "batches); feed unpadded tokens or re-export")  # fmt: skip
    return feeds


@dataclass(frozen=True)
class Tolerance:
    """What a candidate must meet against the fp32 reference, per precision.

    fp32 is judged on the logits themselves, at every position of prompts and streams.
    Reduced precisions (fp16 weights and products, int8, int4) move individual logits by
    design, so they are judged ``held_out_only``: on held-out text
    (``edgeseq.validate.heldout``: top-1, KL, bits per byte, fed through prefill and
    decode graphs as an app feeds them), on top-1 agreement over the 256 greedy decode
    steps, and on what each prefill call hands to decode: its last logits
    (``prefill_logit``) and every state (``prefill_state``, relative L2). Their max abs
    error, drift and KL on greedy streams are reported, not judged (a self-reinforcing
    greedy loop can move them far without changing what the model says). A prefill graph
    is also held to the same bundle's step graph fed the prompt token by token, at the
    tighter ``handoff_*`` limits: both run at one precision, so only their order of
    operations differs. ``None`` means "not judged".
    """

    max_abs_logit: float | None  # largest |candidate - reference| over all logits and steps
    top1_agreement: float  # fraction of positions whose argmax agrees
    kl: float  # mean KL(reference || candidate) per position, nats
    drift: float | None  # largest |error| over the long stream (state fed back thousands of times);
    # with an fp64 oracle the long stream is judged by drift_within instead, wherever this is not None
    bpb_delta: float  # held-out bits-per-byte increase allowed over the fp32 reference
    held_out_only: bool = False  # see above
    prefill_logit: float | None = None  # largest |candidate - reference| of a prefill call's last logits
    prefill_state: float | None = None  # largest relative L2 error of a state a prefill call hands on
    handoff_logit: float | None = None  # prefill_logit, prefill graph vs the bundle's step graph
    handoff_state: float | None = None  # prefill_state, likewise

    def handoff(self) -> Tolerance:
        """The limits a prefill graph is held to against the same bundle's step graph."""
        return replace(self, prefill_logit=self.handoff_logit, prefill_state=self.handoff_state)

    def beside_rounding(self, logit: float, state: float) -> Tolerance:
        """These limits, raised where the fp32 reference itself sits further from fp64 on
        the same inputs (``logit``: its max abs logit distance; ``state``: its largest
        relative L2 state distance): to ``ROUNDING_RATIO`` x that distance. A candidate
        as close to fp64 as DRIFT_RATIO x the reference is within (DRIFT_RATIO + 1) x of
        the reference. Never lowers a limit; a non-finite distance raises none."""

        def raised(limit: float | None, distance: float) -> float | None:
            if limit is None or not math.isfinite(distance):
                return limit
            return max(limit, ROUNDING_RATIO * distance)

        return replace(
            self, max_abs_logit=raised(self.max_abs_logit, logit), prefill_logit=raised(self.prefill_logit, logit),
            handoff_logit=raised(self.handoff_logit, logit), prefill_state=raised(self.prefill_state, state),
            handoff_state=raised(self.handoff_state, state),
        )  # fmt: skip


# Prefill and handoff limits: about 3x the worst of the shipped models (mamba2-tiny,
# hybrid-tiny) at widths 1 and 1/4, flavors portable and opset27, four held-out prompts of
# 1-777 bytes, onnxruntime 1.32 on the CPU (max abs error of the last logits / relative L2
# of the worst state; logits span about +-15):
#
#                 prefill vs fp32 reference     handoff: prefill vs step graph
#       fp32      8.6e-6   / 1.5e-6             5.7e-6 / 7.9e-7
#       fp16      0.088    / 0.026              0.0066 / 0.0024
#       int8      0.78     / 0.094              0.60   / 0.090   (activations quantized per call:
#       int4      1.62     / 0.21               0.12   / 0.012    a prompt and a token differ)
#
# fp16's handoff logit limit is also at least 4 units in the last place of a logit near
# 16-32 (1/64 each): a 50k-row fp16 head over random weights reaches 0.026 by one rounding
# order against the other (matmamba-lm at width 1, seven seeds: 0.006-0.026).
# A graph with one weight's rows shuffled misses these by far more (scripts/mutation_matrix.py).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_logit=1e-4, top1_agreement=1.0, kl=1e-6, drift=1e-4, bpb_delta=1e-4,
                      prefill_logit=1e-4, prefill_state=1e-5, handoff_logit=1e-4, handoff_state=1e-5),
    "fp16": Tolerance(max_abs_logit=None, top1_agreement=0.98, kl=1e-3, drift=None, bpb_delta=0.005, held_out_only=True,
                      prefill_logit=0.3, prefill_state=0.08, handoff_logit=0.0625, handoff_state=0.01),
    "int8": Tolerance(max_abs_logit=None, top1_agreement=0.95, kl=0.01, drift=None, bpb_delta=0.02, held_out_only=True,
                      prefill_logit=2.5, prefill_state=0.3, handoff_logit=2.0, handoff_state=0.3),
    "int4": Tolerance(max_abs_logit=None, top1_agreement=0.90, kl=0.03, drift=None, bpb_delta=0.05, held_out_only=True,
                      prefill_logit=5.0, prefill_state=0.6, handoff_logit=0.4, handoff_state=0.05),
}  # fmt: skip


# --- drift against fp64 ---------------------------------------------------------------
# Over thousands of steps with the state fed back, every fp32 implementation drifts from
# the exact model by its own rounding. Max abs logit distance from fp64 over 4096 greedy
# steps from held-out text (width 1; width 0.5 in brackets):
#
#                        CPU reference     fp32 graph (ORT)   CUDA reference (H100)
#     mamba2-tiny       8.4e-5 (9.2e-5)   9.2e-5 (9.3e-5)    2.9e-4 (1.0e-4)
#     hybrid-tiny       7.5e-5 (1.2e-4)   6.1e-5 (1.0e-4)    9.5e-5 (1.4e-4)
#
# Held to 1e-4 of a CUDA reference, a correct graph fails; held to fp64, a candidate is
# held to what fp32 itself achieves on the same stream, and a failure names the side.
#
# DRIFT_RATIO: correct implementations end within 3.4x of each other (CUDA vs CPU
# reference, mamba2-tiny; graph vs CPU reference 0.8-1.1x, vs CUDA 0.3-1.0x), so 4 passes
# a correct graph beside either reference; a graph run on a GPU beside a CPU reference
# would pass too, with less room (CUDA vs CPU reached 3.9x at step 2048). Wrong graphs are
# off by their own error, not rounding. One layer's A_log (the state's decay) or out_proj
# off by 1e-3 relative ends 4.3e-3 to 0.1 from fp64: at least 6x its model's limit beside
# either reference. Off by 1e-4 relative, 4.7e-4 to 1e-2: failed beside a CPU reference
# (1.3x to 33x its limit), not always beside the noisiest CUDA one (mamba2-tiny at width
# 1: limit 1.2e-3), the price of that reference's noise.
# DRIFT_FLOOR: early in a stream every implementation sits a few 1e-6 from fp64 and their
# ratios swing (CUDA 4.8x the graph at step 1024 of mamba2-tiny), but all stay under 1e-4
# for the first 1024 steps, while wrong graphs of 1e-4 relative error are past 2.5e-4
# within 64 steps. 1e-4 is also the old rule's fp32 drift limit: a short stream is held
# where it was, only now against the exact model.
DRIFT_RATIO = 4.0
DRIFT_FLOOR = 1e-4
# ROUNDING_RATIO: fp32 limits against the fp32 reference are absolute (1e-4 on logits,
# 1e-5 on states), right for models of a few million weights; at 130M (24 layers, a 50k
# head) the reference alone sits 2e-4 to 8e-4 from fp64 on a prompt's last logits and a
# correct graph 5e-4 to 8e-4 from the reference. Where an fp64 oracle runs, a phase's limits
# rise to ROUNDING_RATIO x the reference's own distance from fp64 on the same inputs
# (``Tolerance.beside_rounding``): the drift rule's room, read against the reference.
ROUNDING_RATIO = DRIFT_RATIO + 1


def drift_limit(reference_distance: float) -> float:
    """The largest max abs logit distance from fp64 a candidate may show over a stream on
    which the fp32 reference shows ``reference_distance``. A reference that is itself
    non-finite earns no allowance beyond the floor."""
    if not math.isfinite(reference_distance):
        return DRIFT_FLOOR
    return max(DRIFT_RATIO * reference_distance, DRIFT_FLOOR)


def drift_within(candidate_distance: float, reference_distance: float) -> bool:
    """The drift rule: the candidate's max abs logit distance from fp64 over a stream is
    at most DRIFT_RATIO x the fp32 reference's on the same stream, or at most DRIFT_FLOOR.
    NaN never passes."""
    return candidate_distance <= drift_limit(reference_distance)
