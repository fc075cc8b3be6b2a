"""Runners: one interface (:class:`BaseRunner`) for PyTorch, ONNX Runtime and TensorRT."""
from trt_qat.runners.base import BaseRunner

__all__ = ["BaseRunner"]
