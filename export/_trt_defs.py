"""The ``tensorrt.plugin`` definitions behind ``edgeseq.export.trt_register.register``.

Imported only where TensorRT >= 10.9 is installed. TensorRT reads these functions'
signatures: parameter names and annotations are checked (inputs, then attributes in the
order the plugin declares them, then ``outputs`` and ``tactic`` for aot_impl), so this
module keeps its annotations evaluated (no ``from __future__ import annotations``).

Each aot_impl compiles its kernel for the build's compute capability and returns the PTX,
its entry name, the launch parameters as expressions of the tensors' symbolic sizes, and
the int32 scalars (the sequence length for the scan kernels). Attributes are not kept in
the engine: the sizes they carry are compiled into the PTX.
"""


import tensorrt as trt
import tensorrt.plugin as trtp

from edgeseq.export.trt_plugins import NAMESPACE, output_shapes, plugin_dims
from edgeseq.kernels.aot import compile_entry, launch_grid

AotResult = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]


def _outputs(op: str, attrs: dict, **inputs):
    """The output descriptors: ``trt_plugins.output_shapes`` on the inputs' symbolic shapes, fp32."""
    shapes = {name: desc.shape_expr for name, desc in inputs.items()}
    descs = tuple(trtp.from_shape_expr(s, dtype=trt.float32) for s in output_shapes(op, shapes, attrs, cdiv=trtp.cdiv))
    return descs if len(descs) > 1 else descs[0]


def _launch(kind: str, attrs: dict, cc: int, batch, seqlen=None):
    dims = plugin_dims(attrs)
    kernel = compile_entry(kind, dims, cc)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch_grid(kernel, dims, batch, seqlen, cdiv=trtp.cdiv)
    params.block_x, params.shared_mem = kernel.block, kernel.shared
    scalars = trtp.SymIntExprs(0 if seqlen is None else 1)
    if seqlen is not None:
        scalars[0] = trtp.SymInt32(seqlen)
    return kernel.name, kernel.ptx, params, scalars


def define(cc: int) -> None:
    ns = NAMESPACE
    T = trtp.TensorDesc

    @trtp.register(f"{ns}::EdgeseqSSDChunkState")
    def chunk_state(
        x: T, dt: T, A: T, B: T, state: T, heads: int, ngroups: int, headdim: int, d_state: int, chunk_size: int
    ) -> tuple[T, T, T]:
        attrs = dict(heads=heads, headdim=headdim, d_state=d_state, chunk_size=chunk_size)
        return _outputs("EdgeseqSSDChunkState", attrs, x=x, state=state)

    @trtp.aot_impl(f"{ns}::EdgeseqSSDChunkState")
    def chunk_state_aot(
        x: T, dt: T, A: T, B: T, state: T, heads: int, ngroups: int, headdim: int, d_state: int, chunk_size: int,
        outputs: tuple[T], tactic: int,
    ) -> AotResult:  # fmt: skip
        attrs = dict(heads=heads, ngroups=ngroups, headdim=headdim, d_state=d_state, chunk_size=chunk_size)
        return _launch("chunk_state", attrs, cc, x.shape_expr[0], x.shape_expr[1])

    @trtp.register(f"{ns}::EdgeseqSSDChunkScan")
    def chunk_scan(
        x: T, dt: T, B: T, C: T, chunk_states: T, a_cum: T, D: T,
        heads: int, ngroups: int, headdim: int, d_state: int, chunk_size: int,
    ) -> T:  # fmt: skip
        return _outputs("EdgeseqSSDChunkScan", dict(heads=heads, headdim=headdim, d_state=d_state), x=x)

    @trtp.aot_impl(f"{ns}::EdgeseqSSDChunkScan")
    def chunk_scan_aot(
        x: T, dt: T, B: T, C: T, chunk_states: T, a_cum: T, D: T,
        heads: int, ngroups: int, headdim: int, d_state: int, chunk_size: int, outputs: tuple[T], tactic: int,
    ) -> AotResult:  # fmt: skip
        attrs = dict(heads=heads, ngroups=ngroups, headdim=headdim, d_state=d_state, chunk_size=chunk_size)
        return _launch("chunk_scan", attrs, cc, x.shape_expr[0], x.shape_expr[1])

    @trtp.register(f"{ns}::EdgeseqSSDStep")
    def step(
        xBC: T, dt: T, conv_state: T, conv_weight: T, conv_bias: T, dt_bias: T, A: T, D: T, ssm_state: T,
        heads: int, ngroups: int, headdim: int, d_state: int, d_conv: int, dt_min: float, dt_max: float,
    ) -> tuple[T, T, T]:  # fmt: skip
        attrs = dict(heads=heads, headdim=headdim, d_state=d_state)
        return _outputs("EdgeseqSSDStep", attrs, xBC=xBC, conv_state=conv_state, ssm_state=ssm_state)

    @trtp.aot_impl(f"{ns}::EdgeseqSSDStep")
    def step_aot(
        xBC: T, dt: T, conv_state: T, conv_weight: T, conv_bias: T, dt_bias: T, A: T, D: T, ssm_state: T,
        heads: int, ngroups: int, headdim: int, d_state: int, d_conv: int, dt_min: float, dt_max: float,
        outputs: tuple[T], tactic: int,
    ) -> AotResult:  # fmt: skip
        attrs = dict(heads=heads, ngroups=ngroups, headdim=headdim, d_state=d_state, d_conv=d_conv, dt_min=dt_min,
                     dt_max=dt_max)  # fmt: skip
        return _launch("step", attrs, cc, xBC.shape_expr[0])
