"""The runner contract shared by the PyTorch, ONNX Runtime and TensorRT backends.

A runner maps a feed dict ``{input_name: np.ndarray}`` to an ordered dict ``{output_name: np.ndarray}``.
Evaluation, benchmarking and comparison take any runner, so every backend goes through the same
pre-processing, decoding and NMS. Subclasses override only the ``*_impl`` methods.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from trt_qat.errors import TrtQatError

__all__ = ["BaseRunner"]


class BaseRunner:
    """Base class: owns activation, the context manager, input checks and timing."""

    #: short backend name used in reports ("torch", "ort", "trt")
    backend = "base"

    def __init__(self, name: str | None = None):
        self.name = name or self.backend
        self.is_active = False
        self._last_time = None

    # --- subclass hooks -------------------------------------------------------------------------
    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def infer_impl(self, feed_dict: dict) -> "OrderedDict[str, np.ndarray]":
        raise NotImplementedError

    def input_names_impl(self) -> list[str]:
        raise NotImplementedError

    # --- public API -----------------------------------------------------------------------------
    def activate(self):
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self):
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    @property
    def input_names(self) -> list[str]:
        return list(self.input_names_impl())

    def infer(self, feed_dict) -> "OrderedDict[str, np.ndarray]":
        """Run one inference. ``feed_dict`` may also be a single array for single-input models."""
        if not self.is_active:
            raise TrtQatError(f"runner '{self.name}' is not active; use it as a context manager "
                              "(`with runner:`) or call activate() first")
        if not isinstance(feed_dict, dict):
            names = self.input_names
            if len(names) != 1:
                raise TrtQatError(f"runner '{self.name}' has inputs {names}; pass a dict of arrays")
            feed_dict = {names[0]: feed_dict}
        missing = [n for n in self.input_names if n not in feed_dict]
        if missing:
            raise TrtQatError(f"runner '{self.name}' is missing inputs {missing}; "
                              f"it expects {self.input_names}")
        feed_dict = {k: np.ascontiguousarray(v) for k, v in feed_dict.items()}
        start = time.perf_counter()
        out = self.infer_impl(feed_dict)
        self._last_time = time.perf_counter() - start
        return out

    def last_inference_time(self) -> float | None:
        """Wall time of the last :meth:`infer` call in seconds (host timer)."""
        return self._last_time
