"""The plugin entry kernels compiled ahead of time to PTX, and launched from PTX with the CUDA driver.

TensorRT's AOT plugins (``edgeseq.export.trt_plugins``) hand the engine a PTX string, a
kernel name and launch parameters; the engine then runs with no Python. This module is the
one place that produces those three things, for any compute capability (sm_87 for Jetson
Orin, sm_90 for H100), on any machine with Triton (no GPU needed to compile).
``launch`` loads the same PTX through the CUDA driver and launches it the way TensorRT
does: input pointers, int32 scalars, output pointers, and null for the trailing scratch
pointers Triton appends (TensorRT pads missing arguments with null) — so the PTX can be
checked on a GPU without TensorRT.

    kernel = compile_entry("chunk_state", dims, cc=87)    # PTX, name, block, shared memory
    grid = launch_grid("chunk_state", kernel, dims, batch, seqlen)
"""

from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass
from functools import lru_cache

from edgeseq.errors import BackendError, UsageError
from edgeseq.kernels._triton import next_pow2, require_triton, triton

KINDS = ("chunk_state", "chunk_scan", "step")
MAX_STATIC_SHARED = 48 * 1024  # what a launch gets without opting in; TensorRT's AOT path does not opt in


@dataclass(frozen=True)
class PluginDims:
    """The sizes baked into a plugin kernel: one Mamba2 layer's SSM (its nodes' attributes)."""

    heads: int
    groups: int
    headdim: int
    d_state: int
    chunk: int = 256  # scan only
    d_conv: int = 4  # step only
    dt_min: float = 0.0  # step only: the clamp of softplus(dt + dt_bias)
    dt_max: float = math.inf


@dataclass(frozen=True)
class PluginKernel:
    kind: str
    name: str  # the PTX entry symbol
    ptx: str
    block: int  # threads per block: 32 * num_warps
    shared: int  # dynamic shared memory, bytes
    tiles: tuple[tuple[str, int], ...]  # the tile constexprs, for the grid
    params: tuple[str, ...]  # the PTX entry's parameter types in order ("u64" pointer, "u32" scalar)

    def tile(self, name: str) -> int:
        return dict(self.tiles)[name]


def _tiles(kind: str, d: PluginDims, halve: int = 0) -> dict[str, int]:
    """The tile of a kind (no autotuning ahead of time), cut to the problem; ``halve`` shrinks
    the head-channel block for less shared memory. Every tl.dot operand is at least 16 wide."""
    chunk, p, n = next_pow2(d.chunk), next_pow2(d.headdim), next_pow2(d.d_state)
    block_p = max(16, min(64, p) >> halve)
    if kind == "chunk_state":
        return {"BLOCK_N": min(64, n), "BLOCK_P": min(32, block_p), "BLOCK_K": min(64, chunk)}
    if kind == "chunk_scan":
        return {"BLOCK_M": min(64, chunk), "BLOCK_K": min(32, chunk), "BLOCK_P": block_p, "BLOCK_N": n}
    return {"BLOCK_P": min(32, next_pow2(d.headdim)), "BLOCK_N": next_pow2(d.d_state, 2)}


def _entry(kind: str):
    from edgeseq.kernels import ssd_scan, ssd_states, ssd_step

    return {
        "chunk_state": ssd_states.ssd_chunk_state_entry,
        "chunk_scan": ssd_scan.ssd_chunk_scan_entry,
        "step": ssd_step.ssd_step_entry,
    }[kind]


def _constexprs(kind: str, d: PluginDims) -> dict[str, object]:
    sizes = {"NHEADS": d.heads, "NGROUPS": d.groups, "HEADDIM": d.headdim, "DSTATE": d.d_state}
    if kind == "step":
        return sizes | {"K": d.d_conv, "DT_MIN": float(d.dt_min), "DT_MAX": float(d.dt_max)}
    return sizes | {"CHUNK": d.chunk, "DOT": "tf32x3"}  # fp32 products at fp32-level error


@lru_cache(maxsize=64)
def compile_entry(kind: str, dims: PluginDims, cc: int, num_warps: int = 4) -> PluginKernel:
    """Compile one entry kernel for compute capability ``cc`` (e.g. 87, 90); all tensors fp32.
    Tries two pipeline stages, then one, then narrower tiles, until the shared memory fits."""
    require_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kind not in KINDS:
        raise UsageError(f"unknown plugin kernel {kind!r}; expected one of {', '.join(KINDS)}")
    fn = _entry(kind)
    for halve, num_stages in ((0, 2), (0, 1), (1, 2), (1, 1), (2, 1)):
        tiles = _tiles(kind, dims, halve)
        constexprs = _constexprs(kind, dims) | tiles
        signature = {
            name: "constexpr" if name in constexprs else "i32" if name == "seqlen" else "*fp32" for name in fn.arg_names
        }
        options = {"num_warps": num_warps, "num_stages": num_stages}
        source = ASTSource(fn, signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
        if compiled.metadata.shared <= MAX_STATIC_SHARED:
            break
    md = compiled.metadata
    unsupported = {
        "shared memory over 48 KiB": md.shared > MAX_STATIC_SHARED,
        "global scratch": getattr(md, "global_scratch_size", 0) != 0,
        "profile scratch": getattr(md, "profile_scratch_size", 0) != 0,
        "clusters": getattr(md, "num_ctas", 1) != 1,
    }
    if any(unsupported.values()):
        raise BackendError(f"{kind} kernel for sm_{cc} needs {[k for k, v in unsupported.items() if v]}: "
                           "TensorRT's AOT launch gives none of these")  # fmt: skip
    ptx = compiled.asm["ptx"]
    entry = re.search(rf"\.entry {re.escape(md.name)}\s*\((.*?)\)", ptx, re.DOTALL)
    params = tuple(re.findall(r"\.param \.(u64|u32|b32|s32)", entry.group(1))) if entry else ()
    return PluginKernel(kind, md.name, ptx, 32 * md.num_warps, md.shared, tuple(sorted(tiles.items())), params)


def ceil_div(a, b):
    return -(-a // b)


def launch_grid(kernel: PluginKernel, dims: PluginDims, batch, seqlen=None, cdiv=ceil_div) -> tuple:
    """(grid_x, grid_y, grid_z) for ``batch`` (and ``seqlen``): ints, or TensorRT's symbolic
    sizes with ``cdiv=tensorrt.plugin.cdiv``."""
    t = kernel.tile
    if kernel.kind == "chunk_state":
        return (ceil_div(dims.d_state, t("BLOCK_N")) * ceil_div(dims.headdim, t("BLOCK_P")), batch * dims.heads, 1)
    if kernel.kind == "chunk_scan":
        tiles = ceil_div(dims.chunk, t("BLOCK_M")) * ceil_div(dims.headdim, t("BLOCK_P"))
        return (tiles, batch * dims.heads, cdiv(seqlen, dims.chunk))
    return (ceil_div(dims.headdim, t("BLOCK_P")), dims.heads, batch)


# ---- the driver-level launch (what TensorRT does with the PTX) ------------------------------
@lru_cache(maxsize=1)
def _driver():
    cuda = ctypes.CDLL("libcuda.so.1")
    for fn in ("cuModuleLoadData", "cuModuleGetFunction", "cuLaunchKernel", "cuGetErrorString"):
        getattr(cuda, fn).restype = ctypes.c_int
    return cuda


def _check(status: int, what: str) -> None:
    if status != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(status, ctypes.byref(text))
        raise BackendError(f"{what} failed: CUDA error {status} ({(text.value or b'?').decode()})")


@lru_cache(maxsize=64)
def _function(kernel: PluginKernel) -> ctypes.c_void_p:
    cuda, module, func = _driver(), ctypes.c_void_p(), ctypes.c_void_p()
    _check(cuda.cuModuleLoadData(ctypes.byref(module), kernel.ptx.encode() + b"\0"), "cuModuleLoadData")
    _check(cuda.cuModuleGetFunction(ctypes.byref(func), module, kernel.name.encode()), "cuModuleGetFunction")
    return func


def launch(kernel: PluginKernel, grid: tuple[int, int, int], inputs, scalars, outputs, stream: int = 0) -> None:
    """Load ``kernel.ptx`` with the CUDA driver and launch it: ``inputs`` and ``outputs`` are
    device pointers (ints), ``scalars`` int32 values, in TensorRT's order; the entry's
    remaining parameters (Triton's scratch pointers) get null, as TensorRT pads them."""
    values = [ctypes.c_uint64(p) for p in inputs] + [ctypes.c_int32(s) for s in scalars]
    values += [ctypes.c_uint64(p) for p in outputs]
    if len(values) > len(kernel.params):
        raise UsageError(f"{kernel.name} takes {len(kernel.params)} parameters, got {len(values)}")
    values += [ctypes.c_uint64(0) for _ in kernel.params[len(values) :]]
    args = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
    status = _driver().cuLaunchKernel(
        _function(kernel), *grid, kernel.block, 1, 1, kernel.shared, ctypes.c_void_p(stream), args, None
    )
    _check(status, f"cuLaunchKernel({kernel.name})")
