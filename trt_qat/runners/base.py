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

__all__ = ["BaseRunner", "declared_dims", "check_inputs"]


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


def declared_dims(shape) -> list:
    """A declared input shape with its dynamic dimensions as None.

    Args:
        shape (Sequence): the shape a runner declares: ints, with dynamic dimensions as strings (ONNX symbolic
            names), None, or -1 (TensorRT).

    Returns:
        list[int | None]: the fixed dimensions as ints, the dynamic ones as None.
    """
    return [int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in shape]


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d is None or (isinstance(d, (int, np.integer)) and d < 0) else str(d)
                           for d in shape) + "]"


def check_inputs(runner, shapes: dict, dtypes: dict | None = None, what: str = "the inputs",
                 hint: str = "give arrays of the shapes and dtypes the model declares") -> None:
    """Refuse, before anything runs, inputs that an active runner's declared inputs cannot take: an input the
    caller does not give, another rank, a fixed dimension that differs, another dtype. Runners that declare no
    shapes (PyTorch) are checked by input name only.

    Args:
        runner (BaseRunner): an active runner; ``input_shapes`` and ``input_dtypes`` are used when it has them.
        shapes (dict): ``{input name: shape}`` the caller is about to feed.
        dtypes (dict | None): ``{input name: dtype}``; None skips the dtype check. Defaults to None.
        what (str): what the inputs are, for the message (e.g. "the evaluation images"). Defaults to "the inputs".
        hint (str): how to fix a mismatch, for the message.

    Raises:
        TrtQatError: one line naming the input, what the model declares and what was given.
    """
    source = getattr(runner, "source", None) or runner.name
    names = runner.input_names
    missing = [n for n in names if n not in shapes]
    if missing:
        raise TrtQatError(f"'{source}' takes the inputs {names}, got none for {missing} from {what}; {hint}")
    declared = getattr(runner, "input_shapes", None) or {}
    declared_types = getattr(runner, "input_dtypes", None) or {}
    for name in names:
        given = tuple(int(d) for d in shapes[name])
        given_type = np.dtype(dtypes[name]) if dtypes and name in dtypes else None
        fixed = declared_dims(declared[name]) if name in declared else None
        want_type = np.dtype(declared_types[name]) if name in declared_types else None
        shape_ok = fixed is None or (len(fixed) == len(given) and all(f is None or f == g
                                                                      for f, g in zip(fixed, given)))
        type_ok = given_type is None or want_type is None or given_type == want_type
        if not (shape_ok and type_ok):
            want = (_shape_text(declared[name]) if fixed is not None else "any shape") + (
                f" {want_type.name}" if want_type is not None else "")
            got = _shape_text(given) + (f" {given_type.name}" if given_type is not None else "")
            raise TrtQatError(f"input '{name}' of '{source}' takes {want}, got {got} from {what}; {hint}")
