"""Instrumentation: swap a model's layers for pytorch-quantization modules with TensorRT-friendly quantizers.

* Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear get per-channel INT8 weights (axis 0; axis 1 for
  ConvTranspose) and a per-tensor INT8 input quantizer.
* MaxPool/AvgPool get a per-tensor input quantizer (TensorRT runs them in INT8 when their input is quantized).
* Module names matching a ``skip`` regex stay in float.

The swap is explicit (module by module); unlike ``quant_modules.initialize()`` it never monkey-patches
``torch.nn``, so the user's other models are untouched. Every quantizer is a :class:`TrtQuantizer`, a
``TensorQuantizer`` whose fake-quant is torch's native op with the exact semantics of ONNX
QuantizeLinear/DequantizeLinear (round half to even, range [-128, 127]) in training, evaluation and export,
so PyTorch fake-quant and the exported graph compute the same function.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from trt_qat.config import QuantConfig
from trt_qat.errors import LOG, TrtQatError
from trt_qat.quant.fake_quant import (
    FakeQuantCache,
    HistogramMaxCalibrator,
    fake_quant,
    remember_fake_quant,
    reuse_fake_quant,
)

__all__ = ["TrtQuantizer", "quantize", "quantizer_summary", "iter_quantizers", "save_quantized", "load_quantized",
           "load_model", "check_amax", "QUANT_FORMAT"]

QUANT_FORMAT = "trt_qat.quantized/1"


def _qnn():
    from pytorch_quantization import nn as quant_nn

    return quant_nn


def _quiet_absl():
    """pytorch-quantization logs through absl at INFO/WARNING for every quantizer; keep that quiet without touching
    the root logger's level (absl's set_verbosity would)."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


class TrtQuantizer(_qnn().TensorQuantizer):
    """A TensorQuantizer with TensorRT semantics, CPU-safe loading and single-pass calibration statistics.

    Args:
        axis (int | None): per-channel axis, or None for per-tensor. Defaults to None.
        num_bits (int): Defaults to 8.
        num_bins (int): histogram bins for calibration. Defaults to 2048.
        role (str): "input" or "weight" (for summaries). Defaults to "input".
    """

    def __init__(self, axis=None, num_bits=8, num_bins=2048, role="input"):
        from pytorch_quantization.tensor_quant import QuantDescriptor

        _quiet_absl()
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


def _quant_map():
    qnn = _qnn()
    return {
        nn.Conv1d: (qnn.QuantConv1d, 0),
        nn.Conv2d: (qnn.QuantConv2d, 0),
        nn.Conv3d: (qnn.QuantConv3d, 0),
        nn.ConvTranspose1d: (qnn.QuantConvTranspose1d, 1),
        nn.ConvTranspose2d: (qnn.QuantConvTranspose2d, 1),
        nn.ConvTranspose3d: (qnn.QuantConvTranspose3d, 1),
        nn.Linear: (qnn.QuantLinear, 0),
    }


def _pool_map():
    qnn = _qnn()
    return {
        nn.MaxPool1d: qnn.QuantMaxPool1d,
        nn.MaxPool2d: qnn.QuantMaxPool2d,
        nn.MaxPool3d: qnn.QuantMaxPool3d,
        nn.AvgPool1d: qnn.QuantAvgPool1d,
        nn.AvgPool2d: qnn.QuantAvgPool2d,
        nn.AvgPool3d: qnn.QuantAvgPool3d,
        nn.AdaptiveAvgPool1d: qnn.QuantAdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d: qnn.QuantAdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d: qnn.QuantAdaptiveAvgPool3d,
    }


def _swap(module: nn.Module, qcls):
    """Create an instance of ``qcls`` sharing ``module``'s parameters and attributes (no copy)."""
    new = qcls.__new__(qcls)
    new.__dict__.update(module.__dict__)
    # fresh containers so that quantizers added to ``new`` don't leak into the original module
    new._modules = dict(module._modules)
    return new


def _skip_reason(name: str, module: nn.Module, config: QuantConfig, patterns) -> str | None:
    if any(p.search(name) for p in patterns):
        return "skip pattern"
    if config.min_channels and isinstance(module, nn.modules.conv._ConvNd):
        c = module.in_channels
        if c < config.min_channels and c % 8 != 0:
            return f"in_channels={c} < min_channels={config.min_channels}"
    return None


def quantize(model: nn.Module, config: QuantConfig | None = None, sample_input: torch.Tensor | None = None):
    """Instrument ``model`` in place with TensorRT-style quantizers and return it.

    Args:
        model (nn.Module): any model. Modified in place.
        config (QuantConfig): Defaults to ``QuantConfig()``.
        sample_input (torch.Tensor): an example input, used to trace the dataflow for the placement rules
            (shared scales, quantized residual Adds). Without it the rules are not applied.

    Returns:
        nn.Module: the same model. :func:`quantizer_summary` prints the table of what was quantized (and what was
            left in float, and why); a one-line count is logged.
    """
    config = config or QuantConfig()
    if not isinstance(model, nn.Module):
        raise TrtQatError(f"quantize() needs an nn.Module, got {type(model).__name__}")
    patterns = [re.compile(p) for p in config.skip]
    qmap, pmap = _quant_map(), _pool_map()
    qclasses = {q for q, _ in qmap.values()} | set(pmap.values())
    rows, skipped = [], []

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if type(child) in qclasses:
                continue  # already quantized
            target = qmap.get(type(child))
            pool = pmap.get(type(child)) if config.quantize_pooling else None
            if target is None and pool is None:
                visit(child, name)
                continue
            reason = _skip_reason(name, child, config, patterns)
            if reason:
                skipped.append((name, type(child).__name__, reason))
                continue
            if target is not None:
                qcls, waxis = target
                new = _swap(child, qcls)
                new._input_quantizer = TrtQuantizer(None, config.num_bits, config.num_bins, "input")
                new._weight_quantizer = TrtQuantizer(waxis if config.per_channel_weights else None,
                                                     config.num_bits, config.num_bins, "weight")
                new._weight_quantizer._calibrator.collect_histogram = False
            else:
                new = _swap(child, pool)
                new._input_quantizer = TrtQuantizer(None, config.num_bits, config.num_bins, "input")
            setattr(parent, child_name, new)
            rows.append((name, type(child).__name__))

    visit(model, "")
    if config.rules and sample_input is not None:
        from trt_qat.quant.rules import apply_rules

        apply_rules(model, sample_input, skip=config.skip)
    model.trt_qat_quant_config = dataclasses.asdict(config)
    model.trt_qat_skipped = skipped
    LOG.info("quantized %d layers, %d left in float by rule", len(rows), len(skipped))
    return model


def iter_quantizers(model: nn.Module):
    """Yield ``(name, quantizer)`` for every distinct TensorQuantizer in ``model`` (shared ones once)."""
    from pytorch_quantization.nn import TensorQuantizer

    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def _enabled(q) -> bool:
    return not q._disabled and q._if_quant


def check_amax(model: nn.Module, stage: str = "export") -> None:
    """Raise TrtQatError naming the first enabled quantizer whose amax is missing, zero, negative or not finite."""
    for name, q in iter_quantizers(model):
        if not _enabled(q):
            continue
        amax = q.amax
        if amax is None:
            problem = "has no amax (it was never calibrated)"
        elif not torch.isfinite(amax).all():
            problem = "has a NaN or infinite amax"
        elif (amax <= 0).any():
            problem = "has a zero or negative amax"
        else:
            continue
        raise TrtQatError(f"quantizer '{name}' {problem}; run `trt-qat calibrate` (or trt_qat.calibrate()) before "
                          f"{stage}, or disable that quantizer")


def quantizer_summary(model: nn.Module) -> str:
    """A table of every quantizer: name, role, granularity, amax and state."""
    lines = [f"{'quantizer':<58} {'role':<6} {'axis':<6} {'amax':<24} state"]
    n = 0
    for name, q in iter_quantizers(model):
        n += 1
        amax = q.amax
        if amax is None:
            a = "-"
        elif amax.numel() == 1:
            a = f"{float(amax):.5g}"
        else:
            a = f"[{float(amax.min()):.3g}, {float(amax.max()):.3g}]({amax.numel()})"
        state = "enabled" if _enabled(q) else "disabled"
        lines.append(f"{name:<58} {getattr(q, 'role', '?'):<6} {str(q.axis):<6} {a:<24} {state}")
    for name, kind, reason in getattr(model, "trt_qat_skipped", []):
        lines.append(f"{name:<58} float  -      -                        {kind} kept in float: {reason}")
    lines.append(f"{n} quantizers")
    return "\n".join(lines)


def save_quantized(model: nn.Module, path, extra: dict | None = None):
    """Save a quantized model (weights, amax, quant config, model config) atomically to ``path``."""
    from trt_qat.fileio import atomic_path

    ckpt = {
        "format": QUANT_FORMAT,
        "quant_config": getattr(model, "trt_qat_quant_config", dataclasses.asdict(QuantConfig())),
        "rules_input_shape": getattr(model, "trt_qat_rules_input_shape", None),
        "model_cfg": getattr(model, "cfg", None),
        "state_dict": model.state_dict(),
        "disabled_quantizers": [name for name, q in iter_quantizers(model) if q._disabled],
    }
    ckpt.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def _read_checkpoint(path) -> dict:
    from trt_qat.fileio import read_checkpoint

    return read_checkpoint(path)


def load_quantized(path, model: nn.Module | None = None):
    """Rebuild a quantized model saved by :func:`save_quantized`.

    Args:
        path (str): checkpoint path.
        model (nn.Module): the FP32 architecture to instrument. Defaults to rebuilding the built-in model from the
            checkpoint's ``model_cfg``.
    """
    return _quantized_from_checkpoint(_read_checkpoint(path), path, model)


def _quantized_from_checkpoint(ckpt: dict, path, model: nn.Module | None = None):
    if ckpt.get("format") != QUANT_FORMAT:
        raise TrtQatError(f"'{path}' is not a trt_qat quantized checkpoint; produce one with `trt-qat calibrate`")
    if model is None:
        if not ckpt.get("model_cfg"):
            raise TrtQatError(f"'{path}' has no model_cfg; pass the FP32 model to load_quantized(path, model)")
        from trt_qat.models.yolo import _model_from_cfg

        model = _model_from_cfg(dict(ckpt["model_cfg"]))
    from trt_qat.config import from_dict

    if not isinstance(ckpt.get("quant_config"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise TrtQatError(f"checkpoint '{path}' lacks its quant_config or state_dict; re-run `trt-qat calibrate`")
    qcfg = from_dict(QuantConfig, ckpt["quant_config"], "quant_config")
    sample = None
    if qcfg.rules and ckpt.get("rules_input_shape"):
        sample = torch.zeros(ckpt["rules_input_shape"])
    quantize(model, qcfg, sample_input=sample)
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        detail = str(exc).strip().splitlines()[-1].strip()
        raise TrtQatError(f"checkpoint '{path}' does not match the model ({detail}); load it with the same "
                          "architecture it was saved from") from None
    quantizers = dict(iter_quantizers(model))
    for name in ckpt.get("disabled_quantizers", []):
        if name in quantizers:
            quantizers[name].disable()
    if missing or unexpected:
        raise TrtQatError(f"checkpoint '{path}' does not match the model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); load it with the same architecture it was saved from")
    return model, ckpt


def load_model(path):
    """Load a quantized (``calibrate``/``qat``) or FP32 (``trt-qat train``) built-in model checkpoint, reading the
    file once.

    Returns:
        tuple[nn.Module, dict, bool]: the model, the checkpoint dict, and whether the model is quantized.
    """
    ckpt = _read_checkpoint(path)
    if ckpt.get("format") == QUANT_FORMAT:
        model, _ = _quantized_from_checkpoint(ckpt, path)
        return model, ckpt, True
    from trt_qat.models.yolo import model_from_checkpoint

    return model_from_checkpoint(ckpt, path), ckpt, False
