"""Runners: one interface (:class:`BaseRunner`) for PyTorch, ONNX Runtime and TensorRT."""
from .base import BaseRunner

__all__ = ["BaseRunner"]
