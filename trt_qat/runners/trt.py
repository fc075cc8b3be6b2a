"""TensorRT runner: deserializes an engine, checks its metadata, and runs it through pycuda.

* page-locked host buffers, device buffers and one CUDA stream, re-allocated when a larger shape arrives
  (dynamic batch);
* TensorRT >= 10: ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` (optionally replayed
  from a captured CUDA graph); TensorRT 8.6: ``set_binding_shape`` + ``execute_async_v2`` with bindings;
* CUDA events around the H2D copies, the compute and the D2H copies, so the benchmark reports trtexec's
  H2D Latency / GPU Compute Time / D2H Latency separately (:meth:`TrtRunner.last_timings`).

``tensorrt`` and ``pycuda`` are imported when the runner is activated, never at module import.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from trt_qat.errors import LOG, TrtQatError
from trt_qat.runners.base import BaseRunner

__all__ = ["TrtRunner"]


def _import_pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise TrtQatError("pycuda is not installed: `pip install pycuda` (needs the CUDA toolkit), or use the "
                          "Docker image (docker/README.md)") from None
    try:
        import pycuda.autoprimaryctx  # noqa: F401  (pycuda >= 2021.1: share the primary context with TensorRT)
    except ImportError:
        import pycuda.autoinit  # noqa: F401
    except Exception as exc:  # no driver / no device
        raise TrtQatError(f"CUDA is not usable here ({' '.join(str(exc).split())}); TensorRT engines need an "
                          "NVIDIA GPU and driver (run with `docker run --runtime nvidia` / `--gpus all`)") from None
    return cuda


class _Tensor:
    """One engine I/O tensor: name, direction, dtype, binding index (8.6) and its buffers."""

    def __init__(self, name, is_input, dtype, index):
        self.name = name
        self.is_input = is_input
        self.dtype = np.dtype(dtype)
        self.index = index
        self.capacity = 0  # elements allocated
        self.host = None
        self.device = None
        self.shape = None

    def ensure(self, cuda, nelem: int) -> bool:
        """Grow the buffers to ``nelem`` elements; return True if they were re-allocated."""
        nelem = max(int(nelem), 1)
        if nelem <= self.capacity:
            return False
        self.free()
        self.host = cuda.pagelocked_empty(nelem, self.dtype)
        self.device = cuda.mem_alloc(nelem * self.dtype.itemsize)
        self.capacity = nelem
        return True

    def free(self):
        if self.device is not None:
            self.device.free()
        self.host = self.device = None
        self.capacity = 0


class TrtRunner(BaseRunner):
    """Runs a serialized TensorRT engine.

    Args:
        engine_path (str | Path): the ``.engine`` file.
        name (str | None): the runner's name in reports. Defaults to "trt".
        check_metadata (bool): refuse an engine whose ``<engine>.json`` names another TensorRT version or GPU
            architecture. Defaults to True.
        cuda_graph (bool): capture the enqueue into a CUDA graph and replay it (TensorRT >= 10 only; the
            graph is re-captured when shapes change). Defaults to False.
    """

    backend = "trt"

    def __init__(self, engine_path, name: str | None = None, check_metadata: bool = True, cuda_graph: bool = False):
        super().__init__(name=name)
        self.engine_path = Path(engine_path)
        self.source = str(self.engine_path)
        if not self.engine_path.is_file():
            raise TrtQatError(f"engine '{self.engine_path}' does not exist; build one with "
                              "`python -m trt_qat.build_engine --onnx model.onnx`")
        self.check_metadata = check_metadata
        self.cuda_graph = cuda_graph
        self.metadata = None
        self.engine = self.context = self.stream = None
        self._tensors: list[_Tensor] = []
        self._timings = None
        self._graph_exec = None
        self._graph_key = None
        self._declared = {}

    # --- activation -----------------------------------------------------------------------------------
    def activate_impl(self):
        from trt_qat.trt.metadata import check_engine_metadata, read_engine_metadata
        from trt_qat.trt.util import import_tensorrt

        trt = import_tensorrt()
        cuda = _import_pycuda()
        self._trt, self._cuda = trt, cuda
        self.metadata = read_engine_metadata(self.engine_path)
        if self.check_metadata:
            dev = cuda.Context.get_device()
            major, minor = dev.compute_capability()
            for warning in check_engine_metadata(self.metadata, trt.__version__, dev.name(), f"{major}.{minor}"):
                LOG.warning("%s: %s", self.engine_path.name, warning)
        else:
            LOG.debug("engine metadata check skipped for %s", self.engine_path)

        self.major = int(trt.__version__.split(".")[0])
        self.api = "v2" if self.major < 10 else "v3"
        self._logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise TrtQatError(f"TensorRT {trt.__version__} cannot deserialize '{self.engine_path}': it is corrupt or "
                              "was built by another TensorRT version or for another GPU; rebuild it here with "
                              "`python -m trt_qat.build_engine`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TrtQatError(f"cannot create an execution context for '{self.engine_path}' (out of GPU memory?)")
        self.stream = cuda.Stream()
        self._events = [cuda.Event() for _ in range(4)]
        self._tensors = self._enumerate_tensors()
        self._declared = self.input_shapes
        self._graph_exec = self._graph_key = None
        if self.cuda_graph and self.api == "v2":
            LOG.warning("CUDA graphs need TensorRT >= 10 (execute_async_v3); running without them")
            self.cuda_graph = False

    def _enumerate_tensors(self):
        trt, engine = self._trt, self.engine
        tensors = []
        if self.api == "v3":
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                tensors.append(_Tensor(name, is_input, trt.nptype(engine.get_tensor_dtype(name)), i))
        else:
            per_profile = engine.num_bindings // max(engine.num_optimization_profiles, 1)
            for i in range(per_profile):  # profile 0's bindings
                tensors.append(_Tensor(engine.get_binding_name(i), engine.binding_is_input(i),
                                       trt.nptype(engine.get_binding_dtype(i)), i))
        return tensors

    def deactivate_impl(self):
        for t in self._tensors:
            t.free()
        self._tensors = []
        self._graph_exec = None
        self.context = self.engine = self.stream = None

    # --- introspection --------------------------------------------------------------------------------
    def input_names_impl(self) -> list[str]:
        self._require_active()
        return [t.name for t in self._tensors if t.is_input]

    @property
    def output_names(self) -> list[str]:
        self._require_active()
        return [t.name for t in self._tensors if not t.is_input]

    def profile_shapes(self, name: str):
        """(min, opt, max) shapes of input ``name`` in optimization profile 0."""
        self._require_active()
        if self.api == "v3":
            return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
        return tuple(tuple(s) for s in self.engine.get_profile_shape(0, name))

    @property
    def input_shapes(self) -> dict:
        """``{name: shape}`` as the engine declares it (-1 for dynamic dimensions)."""
        self._require_active()
        if self.api == "v3":
            return {t.name: tuple(self.engine.get_tensor_shape(t.name)) for t in self._tensors if t.is_input}
        return {t.name: tuple(self.engine.get_binding_shape(t.index)) for t in self._tensors if t.is_input}

    @property
    def input_dtypes(self) -> dict:
        self._require_active()
        return {t.name: t.dtype for t in self._tensors if t.is_input}

    def _require_active(self):
        if self.context is None:
            raise TrtQatError(f"runner '{self.name}' is not active; use it as a context manager "
                              "(`with runner:`) or call activate() first")

    # --- inference ------------------------------------------------------------------------------------
    def _set_shapes(self, feed_dict) -> bool:
        """Set input shapes, size buffers; return True if anything changed (addresses or shapes)."""
        changed = False
        for t in self._tensors:
            if not t.is_input:
                continue
            arr = feed_dict[t.name]
            if arr.dtype != t.dtype:
                raise TrtQatError(f"input '{t.name}' of '{self.engine_path.name}' expects {t.dtype.name}, got "
                                  f"{arr.dtype.name}; convert it with arr.astype(np.{t.dtype.name})")
            if t.shape != arr.shape:
                declared = self._declared[t.name]
                if all(d >= 0 for d in declared):  # static input: nothing to set, the shape must match
                    ok = tuple(declared) == tuple(arr.shape)
                elif self.api == "v3":
                    ok = self.context.set_input_shape(t.name, arr.shape)
                else:
                    ok = self.context.set_binding_shape(t.index, arr.shape)
                if not ok:
                    try:
                        mn, _, mx = self.profile_shapes(t.name)
                        allowed = f"between {mn} and {mx}"
                    except Exception:
                        allowed = f"of {self.input_shapes.get(t.name)}"
                    raise TrtQatError(f"input '{t.name}' shape {arr.shape} is outside the engine's profile "
                                      f"(shapes {allowed}); rebuild with a wider --batch/--maxShapes")
                t.shape = arr.shape
                changed = True
            changed |= t.ensure(self._cuda, arr.size)
        for t in self._tensors:
            if t.is_input:
                continue
            shape = tuple(self.context.get_tensor_shape(t.name) if self.api == "v3"
                          else self.context.get_binding_shape(t.index))
            if any(d < 0 for d in shape):
                raise TrtQatError(f"output '{t.name}' has a data-dependent shape {shape}, which this runner does not "
                                  "support; export the model without in-graph NMS")
            if shape != t.shape:
                t.shape = shape
                changed = True
            changed |= t.ensure(self._cuda, int(np.prod(shape)))
        if self.api == "v3" and changed:
            for t in self._tensors:
                self.context.set_tensor_address(t.name, int(t.device))
        return changed

    def _enqueue(self):
        """Launch the engine on the stream (graph replay when enabled); return host seconds spent enqueuing."""
        start = time.perf_counter()
        if self._graph_exec is not None:
            self._graph_exec.launch(self.stream)
            ok = True
        elif self.api == "v3":
            ok = self.context.execute_async_v3(self.stream.handle)
        else:
            ok = self.context.execute_async_v2(bindings=[int(t.device) for t in self._tensors],
                                               stream_handle=self.stream.handle)
        if not ok:
            raise TrtQatError(f"TensorRT failed to run '{self.engine_path.name}'; see the TensorRT log above")
        return time.perf_counter() - start

    def _maybe_capture(self, changed: bool):
        key = tuple((t.name, t.shape, int(t.device)) for t in self._tensors)
        if not self.cuda_graph or (self._graph_exec is not None and key == self._graph_key and not changed):
            return
        if self.api != "v3":
            LOG.warning("CUDA graphs need TensorRT >= 10 (execute_async_v3); running without them")
            self.cuda_graph = False
            return
        self._graph_exec = None
        # one plain run first: TensorRT may allocate or set things up on the first enqueue for a shape
        self.context.execute_async_v3(self.stream.handle)
        self.stream.synchronize()
        try:
            self.stream.begin_capture()
            self.context.execute_async_v3(self.stream.handle)
            graph = self.stream.end_capture()
            self._graph_exec = graph.instantiate()
            self._graph_key = key
        except Exception as exc:  # capture unsupported for this engine (e.g. some plugins) or old pycuda
            LOG.warning("CUDA graph capture failed (%s); running without it", " ".join(str(exc).split()))
            self.cuda_graph = False
            self._graph_exec = None
            try:
                self.stream.synchronize()
            except Exception:
                pass

    def infer_impl(self, feed_dict: dict) -> "OrderedDict[str, np.ndarray]":
        self._require_active()
        cuda = self._cuda
        changed = self._set_shapes(feed_dict)
        self._maybe_capture(changed)
        ev_start, ev_h2d, ev_compute, ev_d2h = self._events
        ev_start.record(self.stream)
        for t in self._tensors:
            if t.is_input:
                arr = feed_dict[t.name]
                host = t.host[:arr.size]
                np.copyto(host, arr.ravel())
                cuda.memcpy_htod_async(t.device, host, self.stream)
        ev_h2d.record(self.stream)
        enqueue_s = self._enqueue()
        ev_compute.record(self.stream)
        outputs = OrderedDict()
        for t in self._tensors:
            if not t.is_input:
                n = int(np.prod(t.shape))
                cuda.memcpy_dtoh_async(t.host[:n], t.device, self.stream)
        ev_d2h.record(self.stream)
        self.stream.synchronize()
        for t in self._tensors:
            if not t.is_input:
                n = int(np.prod(t.shape))
                outputs[t.name] = t.host[:n].reshape(t.shape).copy()
        self._timings = {
            "h2d_ms": ev_start.time_till(ev_h2d),
            "compute_ms": ev_h2d.time_till(ev_compute),
            "d2h_ms": ev_compute.time_till(ev_d2h),
            "enqueue_ms": enqueue_s * 1e3,
        }
        return outputs

    def execute_only(self) -> dict:
        """Run the engine on the inputs already on the device (``--noDataTransfers``); return timings.

        :meth:`infer` must have run once before, to set shapes and upload inputs.
        """
        self._require_active()
        if not self._tensors or any(t.shape is None for t in self._tensors):
            raise TrtQatError("execute_only() needs one infer() call first, to set shapes and upload inputs")
        ev_start, _, ev_compute, _ = self._events
        ev_start.record(self.stream)
        enqueue_s = self._enqueue()
        ev_compute.record(self.stream)
        self.stream.synchronize()
        self._timings = {"h2d_ms": 0.0, "compute_ms": ev_start.time_till(ev_compute), "d2h_ms": 0.0,
                         "enqueue_ms": enqueue_s * 1e3}
        return dict(self._timings)

    def last_timings(self) -> dict | None:
        """CUDA-event timings of the last run in ms: ``h2d_ms``, ``compute_ms``, ``d2h_ms``, and the host-side
        ``enqueue_ms``. None before the first run."""
        return None if self._timings is None else dict(self._timings)

    def __repr__(self):
        return f"TrtRunner({str(self.engine_path)!r}, name={self.name!r})"
