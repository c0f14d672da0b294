"""onnxruntime runner. Torch-free: an app can ship it with numpy and onnxruntime only.

The InferenceSession is built on activate() (graph optimization ALL); ``providers_used``
then says which execution providers onnxruntime actually took, which may be fewer than
were asked for (it falls back to CPU for a provider it lacks). onnxruntime's own
exceptions come out as one-line ``EdgeseqError``s: ``GraphIOError`` when a graph does not
load, ``InferenceError`` when a run fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from edgeseq.errors import RuntimeUnavailableError
from edgeseq.export.spec import IN_PLACE_KEY, GraphIO, TensorSpec
from edgeseq.runtimes.base import (
    GraphIOError,
    InferenceError,
    Runner,
    RunnerNotActiveError,
    check_declared,
    io_from_specs,
)

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class OnnxRuntimeRunner(Runner):
    def __init__(
        self,
        path_or_bytes: str | os.PathLike | bytes,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        intra_op_threads: int | None = None,
        io: GraphIO | None = None,
        name: str | None = None,
        plugins: str | None = None,
    ):
        """``io`` declares the graph's I/O (from ``graph_io``); without it the runner reads
        the I/O from the session on activate. ``plugins`` runs the ``tensorrt`` flavor's
        plugin nodes as custom ops: "reference" (CPU) or "kernels" (their PTX on the GPU);
        see ``edgeseq.runtimes.plugin_ops``."""
        source = path_or_bytes if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
        super().__init__(
            name or ("onnxruntime" if isinstance(source, bytes) else f"onnxruntime:{os.path.basename(source)}")
        )
        self.source = source
        self.providers_requested = list(providers) if providers else ["CPUExecutionProvider"]
        self.intra_op_threads = intra_op_threads
        self.plugins = plugins
        self._declared_io = io
        self._session_io: GraphIO | None = None
        self._session = None
        self.providers_used: list[str] = []

    @property
    def io(self) -> GraphIO:
        if self._declared_io is not None:
            return self._declared_io
        if self._session_io is None:
            raise RunnerNotActiveError(
                f"runner {self.name!r} reads its I/O from the graph; activate it first or pass io="
            )
        return self._session_io

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError("onnxruntime is not installed; pip install onnxruntime") from None

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if self.plugins:
            from edgeseq.runtimes import plugin_ops

            plugin_ops.configure(options, self.plugins)
        try:
            self._session = ort.InferenceSession(self.source, sess_options=options, providers=self.providers_requested)
        except Exception as error:  # noqa: BLE001  onnxruntime's own types derive from Exception only
            raise GraphIOError(f"{self.name}: onnxruntime cannot load the graph: {_first_line(error)}") from None
        self.providers_used = list(self._session.get_providers())
        asked = [p if isinstance(p, str) else p[0] for p in self.providers_requested]
        if dropped := [p for p in asked if p not in self.providers_used]:
            log.warning("%s: onnxruntime did not take %s; running on %s", self.name, dropped, self.providers_used)
        self._session_io = _session_io(self._session)
        meta = self._session.get_modelmeta().custom_metadata_map.get(IN_PLACE_KEY, "")
        self._in_place = frozenset(name for name in meta.split(",") if name)
        if self._declared_io is not None:
            check_declared(self.name, self._declared_io, self._session_io)

    @property
    def in_place_state(self) -> frozenset[str]:
        return frozenset() if self.plugins or self._session is None else self._in_place

    def _deactivate(self) -> None:
        self._session = None
        self._session_io = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in self.io.outputs]
        try:
            outputs = self._session.run(names, feeds)
        except Exception as error:  # noqa: BLE001  onnxruntime's own types derive from Exception only
            if self.plugins:
                from edgeseq.runtimes import plugin_ops

                plugin_ops.raise_pending()  # the op's own error, if one failed, explains the run's
            raise InferenceError(f"{self.name}: onnxruntime failed to run the graph: {_first_line(error)}") from None
        if self.plugins:
            from edgeseq.runtimes import plugin_ops

            plugin_ops.raise_pending()
        return dict(zip(names, outputs))


    def _infer_into(self, feeds: dict[str, np.ndarray], into: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Through an IO binding: feeds read where they are, ``into``'s outputs written in
        place, the others (logits) allocated by onnxruntime; no copy of the state either way."""
        if self.plugins:  # plugin nodes report errors after the run: the plain path checks them
            return super()._infer_into(feeds, into)
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        names = [t.name for t in self.io.outputs]
        for name in names:
            if name in into:
                array = into[name]
                binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        try:
            self._session.run_with_iobinding(binding)
        except Exception as error:  # noqa: BLE001  onnxruntime's own types derive from Exception only
            raise InferenceError(f"{self.name}: onnxruntime failed to run the graph: {_first_line(error)}") from None
        values = binding.get_outputs()
        return {name: into[name] if name in into else value.numpy() for name, value in zip(names, values)}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _session_io(session) -> GraphIO:
    def spec(arg) -> TensorSpec:
        shape = tuple(d if isinstance(d, (int, str)) else "?" for d in arg.shape)
        return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape)

    return io_from_specs(tuple(map(spec, session.get_inputs())), tuple(map(spec, session.get_outputs())))
