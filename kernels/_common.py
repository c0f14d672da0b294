"""What the scan kernels share: the tile tuning spaces, their pruning, and the dot.

Each space is small, to keep the first call's autotuning short: (tile, num_warps,
num_stages), smallest first (the fallback). Large tiles get 8 warps: at 4 they spill
(ptxas -v, sm_90). Under the interpreter (the CPU tests) one 16-wide tile.
"""

from edgeseq.kernels._triton import interpreting, next_pow2, tl, triton

FP32_DOT = "tf32x3"  # fp32 products on tensor cores, three passes: fp32-level error ("ieee" spills)
KEY = ["chunk_size", "headdim", "dstate"]


def tuning_space(names, tiles):
    return [triton.Config(dict(zip(names, t)), num_warps=w, num_stages=s) for t, w, s in tiles]


def configs(names, tiles):
    """One 16-wide config under the interpreter (the CPU tests), the tuning space on a GPU."""
    if interpreting():
        return [triton.Config(dict.fromkeys(names, 16), num_warps=1)]
    return tuning_space(names, tiles)


def prune(configs, named_args, **kwargs):
    """Drop tiles larger than the padded chunk, head dim or state (they only add masked work)."""
    limit = {
        "BLOCK_M": next_pow2(named_args["chunk_size"]),
        "BLOCK_K": next_pow2(named_args["chunk_size"]),
        "BLOCK_P": next_pow2(named_args["headdim"]),
        "BLOCK_N": next_pow2(named_args["dstate"]),
    }
    kept = [c for c in configs if all(v <= limit[k] for k, v in c.kwargs.items())]
    return kept or configs[:1]


@triton.jit
def dot(a, b, acc, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST moves operands to fp32 first: Triton's CPU interpreter cannot
    multiply bf16 (it sees the raw bits), so the tests round to bf16, then upcast."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT)
