"""The quantizer: a pytorch-quantization ``TensorQuantizer`` with TensorRT semantics, and how to find them in a model.

Every quantizer trt_qat creates is a :class:`TrtQuantizer`, whose fake-quant is torch's native op with the exact
semantics of ONNX QuantizeLinear/DequantizeLinear (round half to even, range [-128, 127]) in training, evaluation
and export, so PyTorch fake-quant and the exported graph compute the same function.
"""
from __future__ import annotations

import torch
from torch import nn

from trt_qat.quant.calibrator import HistogramMaxCalibrator
from trt_qat.quant.fake_quant import FakeQuantCache, fake_quant, remember_fake_quant, reuse_fake_quant

__all__ = ["TrtQuantizer", "iter_quantizers", "activation_quantizers", "quantizer_enabled", "quant_nn", "quiet_absl"]


def quant_nn():
    """``pytorch_quantization.nn``, imported on first use."""
    from pytorch_quantization import nn as quant_nn

    return quant_nn


def quiet_absl():
    """pytorch-quantization logs through absl at INFO/WARNING for every quantizer; keep that quiet without touching
    the root logger's level (absl's set_verbosity would)."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


class TrtQuantizer(quant_nn().TensorQuantizer):
    """A TensorQuantizer with TensorRT semantics, CPU-safe loading and single-pass calibration statistics.

    Args:
        axis (int | None): per-channel axis, or None for per-tensor. Defaults to None.
        num_bits (int): Defaults to 8.
        num_bins (int): histogram bins for calibration. Defaults to 2048.
        role (str): "input" or "weight" (for summaries). Defaults to "input".
    """

    def __init__(self, axis=None, num_bits=8, num_bins=2048, role="input"):
        from pytorch_quantization.tensor_quant import QuantDescriptor

        quiet_absl()
        super().__init__(QuantDescriptor(num_bits=num_bits, axis=axis, calib_method="max"))
        self.role = role
        self._calibrator = HistogramMaxCalibrator(num_bins=num_bins, num_bits=num_bits)
        #: set False to run pytorch-quantization's reference fake-quant (for equivalence tests)
        self.native = True

    @property
    def bound(self) -> int:
        return (1 << (self._num_bits - 1 + int(self._unsigned))) - 1

    def set_amax(self, value: torch.Tensor):
        """Set amax (re-registering the buffer when the shape changes)."""
        value = torch.as_tensor(value, dtype=torch.float32).detach()
        if hasattr(self, "_amax") and self._amax.shape == value.shape:
            self._amax.data.copy_(value.to(self._amax.device))
        else:
            if hasattr(self, "_amax"):
                del self._buffers["_amax"]
            self.register_buffer("_amax", value.clone())

    def _quant_forward(self, inputs):
        if not self.native or self._learn_amax or not self._fake_quant:
            return super()._quant_forward(inputs)
        # torch's native fake-quant semantics (ONNX Q/DQ, range [-128, 127]); fast CPU kernels, same numbers
        cache = self.__dict__.get("_fq_cache")
        if cache is None:
            cache = self.__dict__["_fq_cache"] = FakeQuantCache()
        reuse = not torch.is_grad_enabled() and not torch.jit.is_tracing()
        if reuse:  # eval / calibration: the same weight gives the same fake-quantized weight, batch after batch
            hit = reuse_fake_quant(cache, inputs, getattr(self, "_amax", None), self._scale_amax)
            if hit is not None:
                return hit
        amax = self._get_amax(inputs)
        if not torch.jit.is_tracing():
            # an all-zero channel (dead or pruned filter) has a dynamic amax of 0: any positive amax maps its zeros
            # to zeros, where 0 would give 0/0 = NaN (export refuses a zero amax in check_amax instead)
            amax = amax.clamp_min(1e-12)
        axis = None
        if amax.numel() != 1:
            axis = self._axis if isinstance(self._axis, int) else self._axis[0]
        out = fake_quant(inputs, amax, self._num_bits, self._unsigned, axis, cache=cache)
        if reuse:
            remember_fake_quant(cache, inputs, getattr(self, "_amax", None), self._scale_amax, out)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # pytorch-quantization's version calls .cuda() when the buffer is missing; create it where the data is.
        key = prefix + "_amax"
        if key in state_dict:
            src = state_dict[key]
            if "_amax" not in self._buffers or self._buffers["_amax"].shape != src.shape:
                self._buffers.pop("_amax", None)
                self.register_buffer("_amax", torch.empty_like(src, device="cpu"))
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)


def iter_quantizers(model: nn.Module):
    """Yield ``(name, quantizer)`` for every distinct TensorQuantizer in ``model`` (shared ones once)."""
    from pytorch_quantization.nn import TensorQuantizer

    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def quantizer_enabled(q) -> bool:
    """Whether quantizer ``q`` fake-quantizes (neither disabled nor with quantization switched off)."""
    return not q._disabled and q._if_quant


def activation_quantizers(model: nn.Module) -> list:
    """``(name, quantizer)`` of every enabled activation (non-weight) quantizer: the ones calibration collects
    statistics for."""
    return [(n, q) for n, q in iter_quantizers(model) if getattr(q, "role", "input") != "weight" and not q._disabled]
