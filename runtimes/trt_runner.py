"""TensorRT 10 runner: builds an engine from an ONNX file, or deserializes a saved one.

Constructing it needs nothing; activate() imports tensorrt and torch (for device
buffers) and raises RuntimeUnavailableError where either, or a CUDA device, is missing.

Dynamic axes get one optimization profile: axis 0 of every input (batch) spans
[1, max_batch], any other dynamic axis (sequence) spans [1, max_sequence]. A graph of the
``tensorrt`` export flavor needs edgeseq's plugins registered to build (``edgeseq_plugins_cc``);
other plugin libraries can be loaded with ``plugin_libraries``.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

import numpy as np

from edgeseq.errors import RuntimeUnavailableError
from edgeseq.export.spec import GraphIO, TensorSpec
from edgeseq.runtimes.base import GraphIOError, Runner, RunnerNotActiveError, check_declared, io_from_specs


class TensorRTRunner(Runner):
    def __init__(
        self,
        source: str | os.PathLike | bytes,
        *,
        fp16: bool = False,
        max_batch: int = 1,
        max_sequence: int = 512,
        opt_sequence: int | None = None,
        workspace_bytes: int | None = None,
        plugin_libraries: Sequence[str] = (),
        edgeseq_plugins_cc: int | None = None,
        io: GraphIO | None = None,
        name: str | None = None,
    ):
        """``source``: an ``.onnx`` path (built on activate), or a serialized engine as a
        path (any other suffix) or bytes. ``edgeseq_plugins_cc``: register edgeseq's AOT
        plugins (``edgeseq.export.trt_plugins``) for that compute capability before parsing,
        for graphs of the ``tensorrt`` flavor; the engine then needs no Python to run."""
        source = source if isinstance(source, bytes) else os.fspath(source)
        super().__init__(name or ("tensorrt" if isinstance(source, bytes) else f"tensorrt:{os.path.basename(source)}"))
        self.source, self.fp16 = source, fp16
        self.max_batch, self.max_sequence = max_batch, max_sequence
        self.opt_sequence = opt_sequence or max(1, max_sequence // 2)
        self.workspace_bytes, self.plugin_libraries = workspace_bytes, tuple(plugin_libraries)
        self.edgeseq_plugins_cc = edgeseq_plugins_cc
        self._declared_io, self._engine_io = io, None
        self._engine = self._context = self._stream = self._serialized = None

    @property
    def io(self) -> GraphIO:
        if self._declared_io is not None:
            return self._declared_io
        if self._engine_io is None:
            raise RunnerNotActiveError(f"runner {self.name!r} reads its I/O from the engine; activate it first or pass io=")
        return self._engine_io

    def serialized_engine(self) -> bytes:
        """The engine activate() built or loaded, to save beside a bundle."""
        if self._serialized is None:
            raise RunnerNotActiveError(f"runner {self.name!r} has no engine yet; activate it first")
        return self._serialized

    # -- life cycle -------------------------------------------------------------------

    def _activate(self) -> None:
        trt, torch = import_backend()
        logger = trt.Logger(trt.Logger.WARNING)
        for lib in self.plugin_libraries:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        trt.init_libnvinfer_plugins(logger, "")
        if isinstance(self.source, str) and self.source.endswith(".onnx"):
            self._serialized = self._build(trt, logger)
        elif isinstance(self.source, bytes):
            self._serialized = self.source
        else:
            with open(self.source, "rb") as f:
                self._serialized = f.read()
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(self._serialized)
        if self._engine is None:
            raise GraphIOError(f"{self.name}: TensorRT could not deserialize the engine; rebuild it for this GPU and TensorRT")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._engine_io = _engine_io(trt, self._engine)
        if self._declared_io is not None:
            check_declared(self.name, self._declared_io, self._engine_io)

    def _build(self, trt, logger) -> bytes:
        builder = trt.Builder(logger)
        flags = 0
        if self.edgeseq_plugins_cc is not None:
            from edgeseq.export.trt_register import register

            register(self.edgeseq_plugins_cc)
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(self.source):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise GraphIOError(f"{self.name}: TensorRT cannot parse the graph: {errors}")
        config = builder.create_builder_config()
        if self.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(tensor.shape)
            if -1 in shape:
                profile.set_shape(tensor.name, *self._profile(shape))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise GraphIOError(f"{self.name}: TensorRT failed to build the engine; see its log above")
        return bytes(engine)

    def _profile(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes: axis 0 is the batch, any other dynamic axis the sequence."""
        def fill(batch: int, seq: int) -> tuple[int, ...]:
            return tuple(d if d != -1 else (batch if k == 0 else seq) for k, d in enumerate(shape))

        return fill(1, 1), fill(self.max_batch, self.opt_sequence), fill(self.max_batch, self.max_sequence)

    def _deactivate(self) -> None:
        self._context = self._engine = self._stream = self._engine_io = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keep = []  # device buffers must outlive the enqueue
        with torch.cuda.stream(self._stream):
            for spec in self.io.inputs:
                buf = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to("cuda", non_blocking=False)
                self._context.set_input_shape(spec.name, tuple(buf.shape))
                self._context.set_tensor_address(spec.name, buf.data_ptr())
                keep.append(buf)
            outputs = {}
            for spec in self._engine_io.outputs:
                shape = tuple(self._context.get_tensor_shape(spec.name))
                dtype = torch.from_numpy(np.empty(0, dtype=spec.dtype)).dtype
                outputs[spec.name] = buf = torch.empty(shape, dtype=dtype, device="cuda")
                self._context.set_tensor_address(spec.name, buf.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise GraphIOError(f"{self.name}: TensorRT failed to enqueue the inference")
        self._stream.synchronize()
        return {spec.name: outputs[spec.name].cpu().numpy() for spec in self.io.outputs}


def import_backend():
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeUnavailableError(
            "TensorRT is not installed; install tensorrt>=10 on an NVIDIA machine, or use OnnxRuntimeRunner"
        ) from None
    if not hasattr(trt.IExecutionContext, "execute_async_v3"):
        raise RuntimeUnavailableError(f"TensorRT {trt.__version__} is too old; install tensorrt>=10")
    try:
        import torch
    except ImportError:
        raise RuntimeUnavailableError("TensorRTRunner keeps device buffers in torch; install torch with CUDA") from None
    if not torch.cuda.is_available():
        raise RuntimeUnavailableError("TensorRTRunner needs a CUDA device and none is visible")
    return trt, torch


def _engine_io(trt, engine) -> GraphIO:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        shape = tuple(d if d >= 0 else "?" for d in engine.get_tensor_shape(name))
        spec = TensorSpec(name, dtype, shape)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return io_from_specs(tuple(inputs), tuple(outputs))
