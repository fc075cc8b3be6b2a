"""ONNX Runtime runner: the INT8 reference executor on CPU, and CUDA / TensorRT execution providers where the
``onnxruntime-gpu`` wheel is installed.

``onnxruntime`` is imported lazily, when the runner is activated (or when providers are resolved).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from trt_qat.errors import LOG, TrtQatError
from trt_qat.runners.base import BaseRunner

__all__ = ["OnnxrtRunner", "resolve_providers", "PROVIDER_ALIASES"]

#: short names accepted on the command line -> ONNX Runtime execution provider names
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

_GPU_HINT = ("install the GPU build of ONNX Runtime (`pip uninstall onnxruntime && pip install onnxruntime-gpu`, "
             "matching your CUDA version), or use --providers cpu")

# ONNX Runtime type strings -> numpy dtypes (for random feeds and input checks)
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise TrtQatError("onnxruntime is not installed; `pip install onnxruntime` "
                          "(or onnxruntime-gpu for the CUDA/TensorRT providers)") from None
    return ort


def resolve_providers(providers=None) -> list[str]:
    """Map short provider names to ONNX Runtime provider names and check that they are available.

    Args:
        providers (str | list[str] | None): "cpu", "cuda", "trt" (or full ORT provider names), a
            comma-separated string or a list. Defaults to ["cpu"].

    Returns:
        list[str]: ORT provider names, with CPUExecutionProvider appended as the fallback.
    """
    if providers is None:
        providers = ["cpu"]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    ort = _import_ort()
    available = ort.get_available_providers()
    resolved = []
    for p in providers:
        full = PROVIDER_ALIASES.get(p.strip().lower(), p.strip())
        if full not in available:
            if full in PROVIDER_ALIASES.values() and full != "CPUExecutionProvider":
                raise TrtQatError(f"ONNX Runtime provider '{full}' is not available here "
                                  f"(available: {', '.join(available)}); {_GPU_HINT}")
            raise TrtQatError(f"unknown ONNX Runtime provider '{p}'; use one of "
                              f"{sorted(set(PROVIDER_ALIASES))} or one of {available}")
        if full not in resolved:
            resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


class OnnxrtRunner(BaseRunner):
    """Runs an ONNX model with ONNX Runtime.

    Args:
        onnx_path_or_bytes (str | Path | bytes): the ONNX file, or its serialized bytes.
        providers (str | list[str] | None): execution providers ("cpu", "cuda", "trt"). Defaults to "cpu".
        intra_op_threads (int | None): ORT intra-op thread count. Defaults to ORT's choice.
        name (str | None): the runner's name in reports. Defaults to "ort".
    """

    backend = "ort"

    def __init__(self, onnx_path_or_bytes, providers=None, intra_op_threads: int | None = None,
                 name: str | None = None):
        super().__init__(name=name)
        if isinstance(onnx_path_or_bytes, (bytes, bytearray)):
            self._model = bytes(onnx_path_or_bytes)
            self.source = "<bytes>"
        else:
            path = Path(onnx_path_or_bytes)
            if not path.is_file():
                raise TrtQatError(f"ONNX file '{path}' does not exist; check the path "
                                  "(export one with `trt-qat export`)")
            self._model = str(path)
            self.source = str(path)
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.session = None

    # --- BaseRunner hooks -----------------------------------------------------------------------
    def activate_impl(self):
        ort = _import_ort()
        providers = resolve_providers(self.providers)
        opts = ort.SessionOptions()
        if self.intra_op_threads:
            opts.intra_op_num_threads = int(self.intra_op_threads)
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self._model, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            msg = " ".join(str(exc).split())
            if len(msg) > 300:
                msg = msg[:300] + "..."
            raise TrtQatError(f"ONNX Runtime cannot load '{self.source}' ({type(exc).__name__}: {msg}); "
                              "the file is corrupt or not an ONNX model: re-export it "
                              "with `trt-qat export`") from None
        got = self.session.get_providers()
        if providers[0] not in got:
            LOG.warning("ONNX Runtime fell back from %s to %s for '%s'", providers[0], got, self.source)
        LOG.debug("ORT session for %s on %s", self.source, got)

    def deactivate_impl(self):
        self.session = None

    def _require_session(self):
        if self.session is None:
            raise TrtQatError(f"runner '{self.name}' is not active; use it as a context manager "
                              "(`with runner:`) or call activate() first")
        return self.session

    def input_names_impl(self) -> list[str]:
        return [i.name for i in self._require_session().get_inputs()]

    def infer_impl(self, feed_dict: dict) -> "OrderedDict[str, np.ndarray]":
        sess = self._require_session()
        feed = {}
        for meta in sess.get_inputs():
            arr = feed_dict[meta.name]
            want = _ORT_DTYPES.get(meta.type)
            if want is not None and arr.dtype != want:
                raise TrtQatError(f"input '{meta.name}' of '{self.source}' expects {np.dtype(want).name}, "
                                  f"got {arr.dtype.name}; convert it with arr.astype(np.{np.dtype(want).name})")
            feed[meta.name] = arr
        try:
            outs = sess.run(None, feed)
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            raise TrtQatError(f"ONNX Runtime inference failed on '{self.source}' ({msg}); "
                              f"check the input shapes {self.input_shapes}") from None
        return OrderedDict((o.name, v) for o, v in zip(sess.get_outputs(), outs))

    # --- introspection --------------------------------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._require_session().get_outputs()]

    @property
    def input_shapes(self) -> dict:
        """``{name: shape}``; dynamic dimensions are strings (their symbolic name) or None."""
        return {i.name: tuple(i.shape) for i in self._require_session().get_inputs()}

    @property
    def input_dtypes(self) -> dict:
        """``{name: numpy dtype}`` of each input."""
        return {i.name: np.dtype(_ORT_DTYPES.get(i.type, np.float32)) for i in self._require_session().get_inputs()}

    @property
    def active_providers(self) -> list[str]:
        return list(self._require_session().get_providers())

    def __repr__(self):
        return f"OnnxrtRunner({self.source!r}, providers={self.providers!r}, name={self.name!r})"
