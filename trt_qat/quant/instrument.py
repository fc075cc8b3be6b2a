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
from trt_qat.quant.modules import pool_map, quant_map, swap
from trt_qat.quant.pending import install_pending_rules, rules_status
from trt_qat.quant.quantizer import TrtQuantizer, iter_quantizers, quantizer_enabled
from trt_qat.quant.rules import apply_rules

__all__ = ["quantize", "quantizer_summary", "check_amax"]


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
            (shared scales, quantized residual Adds and attention MatMuls, float layers that do not run in eval).
            Without it the rules run on the model's first forward (the first calibration batch).

    Returns:
        nn.Module: the same model. :func:`quantizer_summary` prints the table of what was quantized (and what was
            left in float, and why); a one-line count is logged.
    """
    config = config or QuantConfig()
    if not isinstance(model, nn.Module):
        raise TrtQatError(f"quantize() needs an nn.Module, got {type(model).__name__}")
    patterns = [re.compile(p) for p in config.skip]
    qmap, pmap = quant_map(), pool_map()
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
                new = swap(child, qcls)
                new._input_quantizer = TrtQuantizer(None, config.num_bits, config.num_bins, "input")
                new._weight_quantizer = TrtQuantizer(waxis if config.per_channel_weights else None,
                                                     config.num_bits, config.num_bins, "weight")
                new._weight_quantizer._calibrator.collect_histogram = False
            else:
                new = swap(child, pool)
                new._input_quantizer = TrtQuantizer(None, config.num_bits, config.num_bins, "input")
            setattr(parent, child_name, new)
            rows.append((name, type(child).__name__))

    visit(model, "")
    model.trt_qat_quant_config = dataclasses.asdict(config)
    model.trt_qat_skipped = skipped
    if config.rules and sample_input is not None:
        apply_rules(model, sample_input, skip=config.skip)
    elif config.rules and rows and getattr(model, "trt_qat_rules_report", None) is None:
        install_pending_rules(model, config.skip)
    LOG.info("quantized %d layers, %d left in float by rule; %s", len(rows), len(skipped), rules_status(model))
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
    lines.append(f"{n} quantizers; {rules_status(model)}")
    return "\n".join(lines)
