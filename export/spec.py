"""The I/O contract of exported graphs, declared once per model.

Every graph (step or prefill, any flavor), every runner and the validator speak these
names. A decode loop feeds each ``present.*`` output back into the ``past.*`` input it
pairs with (``STATE_PAIRS``); ``position`` is fed from ``present.position``.

    step:    input_ids [B, 1] int64, past.*, (position [B])  ->  logits [B, V], present.*
    prefill: input_ids [B, T] int64, past.*, (position [B])  ->  logits [B, V] or [B, T, V], present.*

State shapes are fixed apart from the batch axis B, so memory is constant over a stream.
Tolerances, per precision, live beside the spec: the validator and the users' CI helper
read them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgeseq.config import ModelConfig
from edgeseq.shapes import layer_state_shapes
from edgeseq.width import full

BATCH, SEQ = "batch", "sequence"


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


def needs_position(config: ModelConfig) -> bool:
    return any(s.mixer == "attention" for s in config.layers)


def state_specs(config: ModelConfig, prefix: str, state_dtype: str = "float32") -> list[TensorSpec]:
    """past.{i}.conv / .ssm (Mamba2) or .key / .value (attention), in layer order."""
    specs = []
    for i, width in enumerate(full(config)):
        for kind, shape in layer_state_shapes(config, i, width).items():
            specs.append(TensorSpec(f"{prefix}.{i}.{kind}", state_dtype, (BATCH, *shape)))
    return specs


def graph_io(config: ModelConfig, kind: str, all_logits: bool = False, state_dtype: str = "float32") -> GraphIO:
    """The I/O of the ``kind`` ("step" or "prefill") graph of an extracted model."""
    if kind not in ("step", "prefill"):
        raise ValueError(f"graph kind must be step or prefill, not {kind!r}")
    tokens = 1 if kind == "step" else SEQ
    past, present = state_specs(config, "past", state_dtype), state_specs(config, "present", state_dtype)
    inputs = [TensorSpec("input_ids", "int64", (BATCH, tokens)), *past]
    outputs = [TensorSpec("logits", "float32", (BATCH, SEQ, config.vocab_size) if all_logits else (BATCH, config.vocab_size))]
    outputs += present
    pairs = [(p.name, q.name) for p, q in zip(past, present)]
    if needs_position(config):
        inputs.append(TensorSpec("position", "int64", (BATCH,)))
        outputs.append(TensorSpec("present.position", "int64", (BATCH,)))
        pairs.append(("position", "present.position"))
    return GraphIO(tuple(inputs), tuple(outputs), tuple(pairs))


@dataclass(frozen=True)
class Tolerance:
    """What a candidate must meet against the fp32 reference, per precision.

    fp32 is judged on the logits themselves, at every position of prompts and streams.
    Reduced precisions (fp16 weights and products, int8, int4) move individual logits by
    design, so they are judged ``held_out_only``: on held-out text
    (``edgeseq.validate.heldout``: top-1, KL, bits per byte) and on top-1 agreement over
    the 256 greedy decode steps; their max abs error, drift and KL on prompts and greedy
    streams are reported, not judged (a self-reinforcing greedy loop can move them far
    without changing what the model says). ``None`` means "not judged".
    """

    max_abs_logit: float | None  # largest |candidate - reference| over all logits and steps
    top1_agreement: float  # fraction of positions whose argmax agrees
    kl: float  # mean KL(reference || candidate) per position, nats
    drift: float | None  # largest |error| over the long stream (state fed back thousands of times)
    bpb_delta: float  # held-out bits-per-byte increase allowed over the fp32 reference
    held_out_only: bool = False  # see above


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_logit=1e-4, top1_agreement=1.0, kl=1e-6, drift=1e-4, bpb_delta=1e-4),
    "fp16": Tolerance(max_abs_logit=None, top1_agreement=0.98, kl=1e-3, drift=None, bpb_delta=0.005, held_out_only=True),
    "int8": Tolerance(max_abs_logit=None, top1_agreement=0.95, kl=0.01, drift=None, bpb_delta=0.02, held_out_only=True),
    "int4": Tolerance(max_abs_logit=None, top1_agreement=0.90, kl=0.03, drift=None, bpb_delta=0.05, held_out_only=True),
}
