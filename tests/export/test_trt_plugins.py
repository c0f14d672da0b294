"""The TensorRT plugins without TensorRT: their PTX (compiled for Jetson's sm_87 and H100's
sm_90), their tensorrt.plugin definitions against a stand-in module, and on a GPU their PTX
loaded and launched through the CUDA driver with the plugin's own launch parameters.

Compilation runs in a subprocess: the kernel tests switch this process to Triton's CPU
interpreter, which cannot compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from edgeseq.export.trt_plugins import PLUGINS

pytest.importorskip("triton", reason="the kernels extra is not installed")


def run_compiled(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env=env, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plugin_kernels_compile_to_ptx_for_jetson_and_h100():
    got = run_compiled("""
        import json
        from edgeseq.kernels.aot import PluginDims, compile_entry
        out = {}
        for name, d in (("tiny", PluginDims(4, 2, 16, 16, chunk=16, dt_min=0.01, dt_max=2.0)),
                        ("130m", PluginDims(24, 1, 64, 128, chunk=256))):
            for kind in ("chunk_state", "chunk_scan", "step"):
                for cc in (87, 90):
                    k = compile_entry(kind, d, cc)
                    out[f"{name} {kind} {cc}"] = {"name": k.name, "params": list(k.params), "block": k.block,
                        "shared": k.shared, "target": [l.split()[1] for l in k.ptx.splitlines() if l.startswith(".target")][0],
                        "entry": f".visible .entry {k.name}(" in k.ptx}
        print(json.dumps(out))
    """)
    scalars = {"chunk_state": 1, "chunk_scan": 1, "step": 0}  # the sequence length
    for key, k in got.items():
        _, kind, cc = key.split()
        spec = next(s for s in PLUGINS.values() if s.kind == kind)
        assert k["target"] == ("sm_87" if cc == "87" else "sm_90a") and k["entry"], key
        # TensorRT's order: inputs, int32 scalars, outputs; then Triton's two scratch pointers (TensorRT pads null)
        expected = ["u64"] * len(spec.inputs) + ["u32"] * scalars[kind] + ["u64"] * (len(spec.outputs) + 2)
        assert k["params"] == expected, key
        assert k["block"] == 128 and 0 < k["shared"] <= 48 * 1024, key


STAND_IN = """
    import json, sys, types
    trt = types.ModuleType("tensorrt"); trtp = types.ModuleType("tensorrt.plugin")
    trt.__version__, trt.QuickPluginCreationRequest, trt.float32, trt.plugin = "10.9.0", object, "float32", trtp
    defs = {}
    def deco(kind):
        def named(name):
            def add(fn):
                defs[(kind, name)] = fn
                return fn
            return add
        return named
    class TensorDesc:
        def __init__(self, shape, dtype="float32"):
            self.shape_expr, self.dtype = list(shape), dtype
        def like(self):
            return TensorDesc(self.shape_expr, self.dtype)
    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0
    class SymInt32:
        def __init__(self, value):
            self.value = value
    class SymIntExprs(list):
        def __init__(self, n):
            super().__init__([None] * n)
    trtp.register, trtp.aot_impl = deco("register"), deco("aot")
    trtp.TensorDesc, trtp.KernelLaunchParams, trtp.SymInt32, trtp.SymIntExprs = TensorDesc, KernelLaunchParams, SymInt32, SymIntExprs
    trtp.SymExprs, trtp.cdiv = SymIntExprs, lambda a, b: -(-a // b)
    trtp.from_shape_expr = lambda shape, dtype: TensorDesc(shape, dtype)
    sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp
"""


def test_tensorrt_plugin_definitions_against_a_stand_in():
    """register(87) with a stand-in tensorrt.plugin: names, signatures in the node contract's
    order, output shapes, and the aot_impl's PTX, grid and scalars for concrete sizes."""
    got = run_compiled(STAND_IN + """
    import inspect
    from edgeseq.export import trt_plugins, trt_register
    from edgeseq.kernels.aot import compile_entry, launch_grid
    trt_register.register(87)
    trt_register.register(87)  # idempotent
    b, t, h, g, p, n, q, k = 2, 37, 4, 2, 16, 16, 16, 4
    attrs = dict(heads=h, ngroups=g, headdim=p, d_state=n, chunk_size=q, d_conv=k, dt_min=0.01, dt_max=2.0)
    shapes = {"x": (b, t, h, p), "dt": (b, t, h), "A": (h,), "B": (b, t, g, n), "C": (b, t, g, n), "state": (b, h, n, p),
              "chunk_states": (b, 3, h, n, p), "a_cum": (b, h, 3 * q), "D": (h,), "xBC": (b, h * p + 2 * g * n),
              "conv_state": (b, h * p + 2 * g * n, k - 1), "conv_weight": (h * p + 2 * g * n, k),
              "conv_bias": (h * p + 2 * g * n,), "dt_bias": (h,), "ssm_state": (b, h, n, p)}
    shapes["dt"] = shapes["dt"]
    out = {}
    for op, spec in trt_plugins.PLUGINS.items():
        reg, aot = defs[("register", f"edgeseq::{op}")], defs[("aot", f"edgeseq::{op}")]
        inputs = [trtp.TensorDesc((b, h) if (op == "EdgeseqSSDStep" and name == "dt") else shapes[name]) for name in spec.inputs]
        values = [attrs[a] for a in spec.attrs]
        descs = reg(*inputs, *values)
        descs = descs if isinstance(descs, tuple) else (descs,)
        name, ptx, params, scalars = aot(*inputs, *values, descs, 0)
        dims = trt_plugins.plugin_dims(attrs)
        kernel = compile_entry(spec.kind, dims, 87)
        out[op] = {"register": list(inspect.signature(reg).parameters), "aot": list(inspect.signature(aot).parameters),
                   "outputs": [d.shape_expr for d in descs], "name": name, "ptx_is_kernel": ptx == kernel.ptx,
                   "grid": [params.grid_x, params.grid_y, params.grid_z],
                   "expected_grid": list(launch_grid(kernel, dims, b, t)), "block": params.block_x,
                   "shared": params.shared_mem == kernel.shared, "scalars": [s.value for s in scalars]}
    print(json.dumps(out))
    """)
    b, t, h, p, n, q, k = 2, 37, 4, 16, 16, 16, 4
    conv = h * p + 2 * 2 * n
    expected_outputs = {
        "EdgeseqSSDChunkState": [[b, h, 3 * q], [b, 3, h, n, p], [b, h, n, p]],
        "EdgeseqSSDChunkScan": [[b, t, h, p]],
        "EdgeseqSSDStep": [[b, h, p], [b, conv, k - 1], [b, h, n, p]],
    }
    for op, spec in PLUGINS.items():
        g = got[op]
        assert g["register"] == [*spec.inputs, *spec.attrs], op
        assert g["aot"] == [*spec.inputs, *spec.attrs, "outputs", "tactic"], op
        assert g["outputs"] == expected_outputs[op], op
        assert g["ptx_is_kernel"] and g["grid"] == g["expected_grid"] and g["block"] == 128 and g["shared"], op
        assert g["scalars"] == ([] if op == "EdgeseqSSDStep" else [t]), op


def test_register_refuses_old_or_missing_tensorrt(monkeypatch):
    from edgeseq.errors import RuntimeUnavailableError
    from edgeseq.export import trt_register

    monkeypatch.setattr(trt_register, "_registered", {})
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeUnavailableError, match="not installed"):
        trt_register.register(87)
    old = type(sys)("tensorrt")
    old.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(RuntimeUnavailableError, match=r"10\.3\.0 has no AOT Python plugins"):
        trt_register.register(87)


# ---- on a GPU: the PTX itself, through the CUDA driver -----------------------------------
def _scan_case(gen, b, t, h, g, p, n, device="cuda"):
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x, B, C = randn(b, t, h, p), randn(b, t, g, n, scale=n**-0.5), randn(b, t, g, n, scale=n**-0.5)
    dt = F.softplus(randn(b, t, h) - 2)
    A = -torch.exp(torch.rand(h, generator=gen) * 2).to(device)
    return x, dt, A, B, C, randn(h), randn(b, h, n, p, scale=0.3)


def assert_rel(actual, expected, rel, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", [(2, 200, 4, 2, 64, 128, 64), (1, 1000, 24, 1, 64, 128, 256), (3, 7, 4, 4, 16, 16, 16)])
def test_plugin_ptx_through_the_driver_matches_the_reference(case):
    """Each plugin's PTX for this GPU, loaded with cuModuleLoadData and launched with the
    grid, block, shared memory and argument order the TensorRT plugin declares."""
    from edgeseq.kernels import aot
    from edgeseq.kernels.ssd_scan import ssd_chunk_scan_ref
    from edgeseq.kernels.ssd_states import ssd_chunk_state_ref
    from edgeseq.kernels.ssd_step import ssd_step_ref
    from edgeseq.reference import ssd_scan_ref

    b, t, h, g, p, n, q = case
    gen = torch.Generator().manual_seed(sum(case))
    x, dt, A, B, C, D, s0 = _scan_case(gen, b, t, h, g, p, n)
    cc = 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
    dims = aot.PluginDims(h, g, p, n, chunk=q, d_conv=4, dt_min=0.001, dt_max=3.0)
    stream = torch.cuda.current_stream().cuda_stream

    def run(kind, inputs, shapes, scalars, batch, seqlen=None):
        kernel = aot.compile_entry(kind, dims, cc)
        outs = [torch.full(s, float("nan"), device="cuda") for s in shapes]  # every element must be written
        aot.launch(kernel, aot.launch_grid(kernel, dims, batch, seqlen), [i.contiguous().data_ptr() for i in inputs],
                   scalars, [o.data_ptr() for o in outs], stream)  # fmt: skip
        torch.cuda.synchronize()
        return outs

    c = -(-t // q)
    a_cum, states, final = run("chunk_state", [x, dt, A, B, s0], [(b, h, c * q), (b, c, h, n, p), (b, h, n, p)], [t], b, t)
    a_ref, states_ref, _ = ssd_chunk_state_ref(x, dt, A, B, q, s0)
    assert_rel(a_cum, a_ref, 1e-5, "a_cum")
    assert_rel(states, states_ref, 1e-4, "chunk states")
    (y,) = run("chunk_scan", [x, dt, B, C, states, a_cum, D], [(b, t, h, p)], [t], b, t)
    assert_rel(y, ssd_chunk_scan_ref(x, dt, B, C, states_ref, a_ref, D, q), 1e-4, "y")
    Y_ref, final_ref64 = ssd_scan_ref(*(v.double() for v in (x, dt, A, B, C)), q, D.double(), s0.double())
    assert_rel(y, Y_ref, 1e-4, "y against the fp64 reference scan")
    assert_rel(final, final_ref64, 1e-4, "final state against the fp64 reference scan")

    conv_dim = h * p + 2 * g * n
    step_in = [torch.randn(b, conv_dim, generator=gen), torch.randn(b, h, generator=gen) - 1,
               torch.randn(b, conv_dim, 3, generator=gen), torch.randn(conv_dim, 4, generator=gen) * 0.5,
               torch.randn(conv_dim, generator=gen), torch.randn(h, generator=gen)]  # fmt: skip
    step_in = [v.cuda() for v in step_in] + [A, D, s0]
    y, conv, ssm = run("step", step_in, [(b, h, p), (b, conv_dim, 3), (b, h, n, p)], [], b)
    for got, want, name in zip((y, conv, ssm), ssd_step_ref(*step_in, g, 0.001, 3.0), ("y", "conv state", "ssm state")):
        assert_rel(got, want, 1e-5, f"step {name}")


def test_declared_output_shapes_are_what_the_twins_produce():
    """trt_plugins.output_shapes (what the TensorRT definitions declare and the GPU binding
    allocates) against the kernels' twins on random inputs, a length that is not whole chunks."""
    from edgeseq.export.trt_plugins import output_shapes
    from edgeseq.kernels.ssd_scan import ssd_chunk_scan_ref
    from edgeseq.kernels.ssd_states import ssd_chunk_state_ref
    from edgeseq.kernels.ssd_step import ssd_step_ref

    b, t, h, g, p, n, q, k = 2, 37, 4, 2, 8, 16, 16, 4
    attrs = dict(heads=h, ngroups=g, headdim=p, d_state=n, chunk_size=q)
    x, dt, A, B, C, D, s0 = _scan_case(torch.Generator().manual_seed(3), b, t, h, g, p, n, device="cpu")
    state_outs = ssd_chunk_state_ref(x, dt, A, B, q, s0)
    shapes = {"x": tuple(x.shape), "state": tuple(s0.shape)}
    assert [tuple(o.shape) for o in state_outs] == output_shapes("EdgeseqSSDChunkState", shapes, attrs)
    y = ssd_chunk_scan_ref(x, dt, B, C, state_outs[1], state_outs[0], D, q)
    assert [tuple(y.shape)] == output_shapes("EdgeseqSSDChunkScan", shapes, attrs)
    conv = h * p + 2 * g * n
    step_in = [torch.randn(b, conv), torch.randn(b, h), torch.randn(b, conv, k - 1), torch.randn(conv, k),
               torch.randn(conv), torch.randn(h), A, D, s0]  # fmt: skip
    shapes = {"xBC": (b, conv), "conv_state": (b, conv, k - 1), "ssm_state": tuple(s0.shape)}
    got = [tuple(o.shape) for o in ssd_step_ref(*step_in, g)]
    assert got == output_shapes("EdgeseqSSDStep", shapes, attrs)
