"""Instrumentation: swap a model's layers for pytorch-quantization modules with TensorRT-friendly quantizers.

* Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear get per-channel INT8 weights (axis 0; axis 1 for
  ConvTranspose) and a per-tensor INT8 input quantizer.
* MaxPool/AvgPool get a per-tensor input quantizer (TensorRT runs them in INT8 when their input is quantized).
* Module names matching a ``skip`` regex stay in float.

The swap is explicit (module by module); unlike ``quant_modules.initialize()`` it never monkey-patches
``torch.nn``, so the user's other models are untouched. Every quantizer is a
:class:`~trt_qat.quant.quantizer.TrtQuantizer`.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from trt_qat.config import QuantConfig
from trt_qat.errors import LOG, TrtQatError
from trt_qat.quant.quantizer import TrtQuantizer, iter_quantizers, quant_nn, quantizer_enabled
from trt_qat.quant.rules import apply_rules

__all__ = ["quantize", "quantizer_summary", "check_amax"]


def _quant_map():
    qnn = quant_nn()
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
    qnn = quant_nn()
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
        apply_rules(model, sample_input, skip=config.skip)
    elif config.rules and rows:
        LOG.warning("TensorRT placement rules NOT applied: quantize() needs sample_input= (an example input batch) "
                    "to trace the model; without them Concat/Add inputs get separate scales and TensorRT inserts "
                    "reformats. Pass sample_input=torch.zeros(1, 3, H, W), or QuantConfig(rules=False) to silence "
                    "this")
    model.trt_qat_quant_config = dataclasses.asdict(config)
    model.trt_qat_skipped = skipped
    LOG.info("quantized %d layers, %d left in float by rule", len(rows), len(skipped))
    return model


def check_amax(model: nn.Module, stage: str = "export") -> None:
    """Raise TrtQatError naming the first enabled quantizer whose amax is missing, zero, negative or not finite."""
    for name, q in iter_quantizers(model):
        if not quantizer_enabled(q):
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
        state = "enabled" if quantizer_enabled(q) else "disabled"
        lines.append(f"{name:<58} {getattr(q, 'role', '?'):<6} {str(q.axis):<6} {a:<24} {state}")
    for name, kind, reason in getattr(model, "trt_qat_skipped", []):
        lines.append(f"{name:<58} float  -      -                        {kind} kept in float: {reason}")
    lines.append(f"{n} quantizers")
    return "\n".join(lines)
