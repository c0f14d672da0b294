"""The ``tensorrt`` flavor's plugin nodes as onnxruntime custom ops, without TensorRT.

onnxruntime-extensions (in the ``export`` extra) runs a custom-domain node through a
Python function. ``configure(options, backend)`` readies a session for such graphs and
``bind(backend)`` registers one function per plugin of
``edgeseq.export.trt_plugins.PLUGINS``:

- ``"reference"``: the kernels' pure-torch twins, on the CPU;
- ``"kernels"``: the plugin's own PTX (``edgeseq.kernels.aot``, compiled for the GPU at
  hand) loaded and launched through the CUDA driver with the launch parameters the
  TensorRT plugin gives the engine, on torch-allocated device memory.

So a plugin-node graph runs in onnxruntime exactly as exported, and its outputs can be
compared with the reference like any other runner's. The custom ops run on onnxruntime's
CPU provider; the ``kernels`` backend copies each node's inputs to the GPU and back.

onnxruntime-extensions ends the process on an exception inside an op and never
unregisters an op; so each body catches everything, returns empty outputs and leaves the
error for ``raise_pending()`` (the runner calls it after every run), and the ops are
registered once per process, their backend switchable. Its stock hook hands outputs back
as Python lists (about 0.1 µs per element: seconds for a prefill's outputs); its C++ side
also takes numpy arrays, so these ops' outputs go back as arrays, other ops' unchanged.
"""

from __future__ import annotations

import numpy as np

from edgeseq.errors import RuntimeUnavailableError, UsageError
from edgeseq.export.trt_plugins import DOMAIN, PLUGINS, output_shapes, plugin_dims

BACKENDS = ("reference", "kernels")
_state: dict[str, object] = {"backend": None, "error": None, "registered": False}
_ours: dict[int, object] = {}  # onnxruntime-extensions' op id -> its Opdef, for the output hook


def configure(options, backend: str):
    """``options`` (onnxruntime SessionOptions) made ready for plugin-node graphs whose nodes
    run on ``backend``: the custom-op library registered, the ops bound, and onnxruntime's
    worker threads not spinning (the ops' bodies run torch and need those cores). Returns it."""
    bind(backend)
    options.register_custom_ops_library(_extensions().get_library_path())
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        raise RuntimeUnavailableError(
            "running plugin nodes in onnxruntime needs onnxruntime-extensions; pip install 'edgeseq[export]'"
        ) from None
    return onnxruntime_extensions


def bind(backend: str) -> None:
    """Route every plugin node of later runs to ``backend`` ("reference" or "kernels")."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown plugin backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "kernels":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailableError("the 'kernels' plugin backend needs a CUDA device; use 'reference'")
    ext = _extensions()
    if not _state["registered"]:
        for op, spec in PLUGINS.items():
            attrs = {a: ext.PyCustomOpDef.dt_int64 for a in spec.int_attrs}
            attrs |= {a: ext.PyCustomOpDef.dt_float for a in spec.float_attrs}
            opdef = ext.onnx_op(
                op_type=f"{DOMAIN}::{op}",
                inputs=[ext.PyCustomOpDef.dt_float] * len(spec.inputs),
                outputs=[ext.PyCustomOpDef.dt_float] * len(spec.outputs),
                attrs=attrs,
            )(_guarded(op))
            _ours[opdef._id] = opdef
        _install_array_outputs(ext)
        _state["registered"] = True
    _state["backend"] = backend


def _install_array_outputs(ext) -> None:
    """Hand these ops' outputs back as numpy arrays; any other op goes to the stock hook."""
    from onnxruntime_extensions import _ocos

    stock = getattr(_ocos, "_on_pyop_invocation", None)
    if stock is None:  # a version without it: keep its own hook (lists: slower, same results)
        return

    def hook(op_id, feed, attributes):
        opdef = _ours.get(op_id)
        if opdef is None:
            return stock(op_id, feed, attributes)
        result = [op_id]
        for out in opdef.body(*feed, **opdef.cast_attributes(attributes)):  # contiguous float32 arrays
            result += [out.shape, out]
        return tuple(result)

    ext.PyCustomOpDef.install_hooker(hook)


def raise_pending() -> None:
    """Raise the first error an op body caught since the last call, if any."""
    error, _state["error"] = _state["error"], None
    if error is not None:
        raise error


def _guarded(op: str):
    n_out = len(PLUGINS[op].outputs)

    def body(*inputs: np.ndarray, **attrs):
        try:
            if _state["backend"] == "kernels":
                outputs = _launch_plugin(op, *inputs, **attrs)
            else:
                outputs = _REFERENCE[op](*inputs, **attrs)
            return tuple(np.ascontiguousarray(o, dtype=np.float32) for o in outputs)
        except BaseException as error:  # noqa: BLE001  (an escaping exception would end the process)
            _state["error"] = _state["error"] or error
            return tuple(np.zeros(0, np.float32) for _ in range(n_out))

    body.__name__ = op
    return body


# ---- reference: the twins on the CPU ----------------------------------------------------
def _torch(*arrays: np.ndarray):
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def _ref_chunk_state(x, dt, A, B, state, **attrs):
    from edgeseq.kernels.ssd_states import ssd_chunk_state_ref

    X, dt, A, B, state = _torch(x, dt, A, B, state)
    return [t.numpy() for t in ssd_chunk_state_ref(X, dt, A, B, int(attrs["chunk_size"]), state)]


def _ref_chunk_scan(x, dt, B, C, states, a_cum, D, **attrs):
    from edgeseq.kernels.ssd_scan import ssd_chunk_scan_ref

    return [ssd_chunk_scan_ref(*_torch(x, dt, B, C, states, a_cum, D), int(attrs["chunk_size"])).numpy()]


def _ref_step(xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A, D, ssm_state, **attrs):
    from edgeseq.kernels.ssd_step import ssd_step_ref

    args = _torch(xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A, D, ssm_state)
    d = plugin_dims(attrs)
    return [t.numpy() for t in ssd_step_ref(*args, d.groups, d.dt_min, d.dt_max)]


_REFERENCE = {"EdgeseqSSDChunkState": _ref_chunk_state, "EdgeseqSSDChunkScan": _ref_chunk_scan, "EdgeseqSSDStep": _ref_step}


# ---- kernels: the plugin's PTX through the CUDA driver ----------------------------------
def _launch_plugin(op: str, *inputs: np.ndarray, **attrs):
    """The plugin's PTX on this GPU, with the plugin's grid and argument order."""
    import torch

    from edgeseq.kernels import aot

    spec, dims = PLUGINS[op], plugin_dims(attrs)
    major, minor = torch.cuda.get_device_capability()
    kernel = aot.compile_entry(spec.kind, dims, 10 * major + minor)
    shapes = dict(zip(spec.inputs, (a.shape for a in inputs)))
    batch, seqlen = (shapes["xBC"][0], None) if spec.kind == "step" else shapes["x"][:2]
    device_in = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).cuda() for a in inputs]
    device_out = [torch.zeros(s, dtype=torch.float32, device="cuda") for s in output_shapes(op, shapes, attrs)]
    aot.launch(
        kernel, aot.launch_grid(kernel, dims, batch, seqlen), [t.data_ptr() for t in device_in],
        [] if seqlen is None else [seqlen], [t.data_ptr() for t in device_out], torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    torch.cuda.synchronize()
    return [t.cpu().numpy() for t in device_out]
