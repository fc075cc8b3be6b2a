"""The placement rules of a model quantized without a sample input: they run on its first forward.

``quantize(model)`` with no ``sample_input`` (how most pytorch-quantization code reads) installs a
:class:`PendingRules` forward pre-hook on the model. On the first call (the first calibration batch, or whatever
forward comes first: training, evaluation, under ``torch.no_grad``, inside DistributedDataParallel) the hook
removes itself, applies the rules (:func:`trt_qat.quant.rules.apply_rules`) with the first item of that batch,
and lets the forward go on with the rules in place. :func:`trt_qat.calibrate` applies them explicitly before it
switches calibration on, so every quantizer the rules create collects statistics from the first batch.

The model records what happened: ``trt_qat_rules_report`` (``trigger="first forward"``) and
``trt_qat_rules_input_shape``, which :func:`trt_qat.save_quantized` saves so that ``load_quantized`` re-applies
identical rules; a checkpoint saved before any forward loads with the rules pending again.
"""
from __future__ import annotations

import torch
from torch import nn

from trt_qat.errors import LOG, TrtQatError
from trt_qat.quant.quantizer import iter_quantizers, quantizer_enabled
from trt_qat.quant.rules import apply_rules

__all__ = ["PendingRules", "install_pending_rules", "apply_pending_rules", "rules_status"]


def _first_tensor(args):
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, (tuple, list)) and args:
        return _first_tensor(args[0])
    if isinstance(args, dict):
        for key in ("images", "img", "input", "x"):
            if key in args:
                return _first_tensor(args[key])
    return None


class PendingRules:
    """Forward pre-hook applying the placement rules on the model's first forward, then removing itself.

    Args:
        skip (list[str]): the ``QuantConfig.skip`` patterns (see :func:`trt_qat.quant.rules.apply_rules`).
    """

    def __init__(self, skip=()):
        self.skip = list(skip)
        self.handle_id = None

    def remove(self, module: nn.Module):
        module._forward_pre_hooks.pop(self.handle_id, None)

    def __call__(self, module, args):
        self.remove(module)
        if getattr(module, "trt_qat_rules_report", None) is not None:
            return None
        x = _first_tensor(args)
        if x is None and not args:
            LOG.warning("TensorRT placement rules not applied: the model's first forward had no positional input to "
                        "trace them with; call trt_qat.quant.rules.apply_rules(model, sample_input) before "
                        "calibrating, or pass sample_input= to quantize()")
            return None
        if x is not None and x.dim() > 0 and x.shape[0] > 1:
            x = x[:1]  # the rules depend on shapes only: one sample traces as well as the whole batch
        sample = x if x is not None else tuple(args)
        state = torch._C._get_tracing_state() if torch.jit.is_tracing() else None
        if state is not None:  # the first forward is torch.onnx.export's: trace the rules outside its graph
            torch._C._set_tracing_state(None)
        try:
            apply_rules(module, sample, skip=self.skip, trigger="first forward")
        finally:
            if state is not None:
                torch._C._set_tracing_state(state)
        if state is not None:
            missing = [n for n, q in iter_quantizers(module) if quantizer_enabled(q) and q.amax is None]
            if missing:
                raise TrtQatError(f"the placement rules ran only at export (the model had never run a forward) and "
                                  f"added quantizers without amax ({missing[0]}, ...); calibrate after quantize() "
                                  "(trt_qat.calibrate runs them on the first batch), or pass sample_input= to "
                                  "quantize()")
        return None


def install_pending_rules(model: nn.Module, skip=()) -> PendingRules:
    """Make the placement rules run on ``model``'s first forward (once; a second call changes nothing)."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, PendingRules):
            return hook
    hook = PendingRules(skip)
    hook.handle_id = model.register_forward_pre_hook(hook, prepend=True).id
    LOG.info("TensorRT placement rules will run on the model's first forward (the first calibration batch): "
             "quantize() got no sample_input")
    return hook


def apply_pending_rules(model: nn.Module, sample) -> bool:
    """Apply the pending placement rules of ``model`` (or of a module inside it: a DDP wrapper's) now, with
    ``sample``; returns whether any were pending."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, PendingRules):
                with torch.no_grad():
                    hook(module, (sample,))
                return True
    return False


def rules_status(model: nn.Module) -> str:
    """One line: whether the placement rules ran, are pending, or are off."""
    target = next((m for m in model.modules() if hasattr(m, "trt_qat_quant_config")), model)
    report = getattr(target, "trt_qat_rules_report", None)
    if report is not None:
        return (f"placement rules applied (on the {report.trigger}, input {report.input_shape}): "
                f"{report.groups_merged} groups merged, {report.adds_quantized} residual adds and "
                f"{report.matmuls_quantized} matmuls quantized, {len(report.adds_left_alone)} adds left alone, "
                f"{len(report.left_float)} layers that do not run in eval left float")
    if any(isinstance(h, PendingRules) for m in model.modules() for h in m._forward_pre_hooks.values()):
        return "placement rules pending: they run on the model's first forward (the first calibration batch)"
    config = getattr(target, "trt_qat_quant_config", None)
    if isinstance(config, dict) and not config.get("rules", True):
        return "placement rules off (QuantConfig(rules=False))"
    return "placement rules not applied"
