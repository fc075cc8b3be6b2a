"""TensorRT Q/DQ placement rules derived from the model's own dataflow, with no per-model configuration.

:func:`apply_rules` records one forward of a sample input (:func:`trt_qat.quant.trace.trace`: every torch
function outside leaf modules and every module call, in-place ops included). From that graph:

1. **Same scale.** Input quantizers are grouped with a union-find over tensors: quantizers reading one tensor
   (fan-out), the inputs and output of a Concat, the input and output of MaxPool and nearest Resize/Upsample,
   and ops that only move data (view, reshape, permute, slicing, ...). Each group gets ONE shared
   :class:`~trt_qat.quant.quantizer.TrtQuantizer`, so TensorRT can drop the DQ->Q pairs around them.
2. **Residual Add.** For an Add of two same-shape activations where a quantized conv/linear produces one
   input, the skip input (the one the other depends on) is quantized at its producer by an *output
   quantizer* (a registered submodule applied by a forward hook), which is the group's quantizer when the
   tensor is also read by quantized layers. The conv-branch input stays float, so TensorRT fuses the Add
   into that conv's epilogue. A skip input cut out of a module's output by ``chunk``/``split``/``view``/slicing
   is quantized at that module; one produced by a torch function (``x + attn(x)``) at that function's call
   (:mod:`trt_qat.quant.placement`, :mod:`trt_qat.quant.functional`). Input quantizers that only read tensors
   already quantized that way are replaced by :class:`~trt_qat.quant.hooks.QuantizedUpstream` (a pass-through),
   so the ONNX has exactly one Q/DQ pair on the skip path.
3. **Attention.** Both inputs of a MatMul of two activations (``q @ k``, ``attn @ v``) are quantized the same
   way, so TensorRT runs it in INT8. Leaving the attention block in float instead would not remove any Q/DQ
   pair: its ``qkv`` conv output also feeds the INT8 positional (``pe``) conv, and its output Add needs a
   quantized input to fuse into that conv; a float island there costs a reformat on each side (float copies
   of INT8 tensors), while the INT8 MatMuls cost none, and their MACs count as INT8.
4. **Layers that do not run in eval.** Quantized layers that the forward never calls, or whose output never
   reaches the model's output (a one-to-many head kept for training only), are restored to float layers and
   listed in the report (:attr:`RulesReport.left_float`) and in ``model.trt_qat_skipped``: they would only hold
   quantizers that calibration cannot reach and the export drops.

The rules run on ``quantize(model, sample_input=x)``, or, without a sample input, on the first forward of the
model (the first calibration batch; :mod:`trt_qat.quant.pending`). The result is deterministic:
``load_quantized`` re-runs the same rules on a fresh model before loading the state dict, so shared quantizers
stay shared through calibration, QAT, save/load and export.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from trt_qat.errors import LOG, TrtQatError
from trt_qat.quant.hooks import OUTPUTS_ATTR, ResetCallCounters
from trt_qat.quant.modules import to_float
from trt_qat.quant.placement import (
    Sites,
    fold_input_quantizers,
    follow_data_movement,
    install,
    quantize_matmul_inputs,
    quantize_residual_adds,
)
from trt_qat.quant.plan import Plan, RulesReport, count_act_quantizers, live_nodes
from trt_qat.quant.trace import first_float, slot_nodes, trace

__all__ = ["RulesReport", "apply_rules"]


# ------------------------------------------------------------------------------------------------ the steps
def _merge_same_scale(plan: Plan, slots):
    """Step 1: union the values that must share one scale (one quantizer's inputs, Concat, MaxPool, Resize, moves)."""
    values, uf = plan.rec.values, plan.uf
    first_value_of_q = {}
    for node in slots:
        q = node.module._modules["_input_quantizer"]
        v = node.inputs[0]
        if id(q) in first_value_of_q:
            uf.union(first_value_of_q[id(q)], v)  # one module (one quantizer) run on several tensors
        else:
            first_value_of_q[id(q)] = v
    for node, cat in zip(plan.rec.nodes, plan.categories):
        if cat in ("move", "maxpool", "resize"):
            ins = first_float(values, node.inputs[:1])
            for v in first_float(values, node.outputs):
                for u in ins:
                    uf.union(u, v)
        elif cat == "concat":
            members = first_float(values, node.inputs) + first_float(values, node.outputs)
            for v in members[1:]:
                uf.union(members[0], v)


def _share_group_quantizers(plan: Plan, slots, report: RulesReport) -> dict:
    """Step 2: one quantizer per class, the first slot's in trace order; returns ``{class: quantizer}``."""
    class_q = {}
    members = OrderedDict()
    for node in slots:
        c = plan.uf.find(node.inputs[0])
        class_q.setdefault(c, node.module._modules["_input_quantizer"])
        mods = members.setdefault(c, [])
        if all(node.module is not m for m in mods):
            mods.append(node.module)
    for c, mods in members.items():
        rep = class_q[c]
        distinct = []
        for m in mods:
            q = m._modules["_input_quantizer"]
            if all(q is not d for d in distinct):
                distinct.append(q)
        if len(distinct) > 1:
            report.groups_merged += 1
            report.groups.append([plan.name(m) for m in mods])
        for m in mods:
            if m._modules["_input_quantizer"] is not rep:
                m._input_quantizer = rep
                report.quantizers_shared += 1
    return class_q


def _count_shared_ops(plan: Plan, class_q: dict, report: RulesReport):
    """Count the Concat, MaxPool and Resize ops whose output class now has a quantizer."""
    counters = {"concat": "concats", "maxpool": "maxpools", "resize": "resizes"}
    for node, cat in zip(plan.rec.nodes, plan.categories):
        if cat in counters and node.outputs and plan.uf.find(node.outputs[0]) in class_q:
            setattr(report, counters[cat], getattr(report, counters[cat]) + 1)


def _restore_unused_layers(model, plan: Plan, report: RulesReport) -> set:
    """Step 0: quantized layers that do not run in eval (never called), or whose every call is dead in eval (its
    output never reaches the model's output: YOLO26's one-to-one head when the one-to-many one is selected),
    go back to float layers. Returns the ids of the layers restored."""
    rec = plan.rec
    plan.live = live_nodes(rec) if rec.outputs else None  # (an output we cannot follow: keep everything)
    live = {}
    for node in rec.nodes:
        if node.kind == "module":
            live[id(node.module)] = live.get(id(node.module), False) or plan.is_live(node)
    restored = set()
    skipped = model.__dict__.setdefault("trt_qat_skipped", [])
    for name, module in list(model.named_modules()):
        if id(module) in restored or live.get(id(module), False):
            continue
        float_module = to_float(module)
        if float_module is None:
            continue
        if id(module) not in live:
            reason = "does not run in eval: the forward never calls it"
        else:
            reason = ("unused in eval: it runs, but its output never reaches the model's output (a training-only "
                      "branch, which the export drops)")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, float_module)
        restored.add(id(module))
        report.left_float.append((name, reason))
        skipped.append((name, type(float_module).__name__, reason))
    if restored:
        LOG.info("placement rules: %d quantized layers that do not run in eval restored to float", len(restored))
    return restored


# ---------------------------------------------------------------------------------------------- entry point
def apply_rules(model: nn.Module, sample_input, skip=(), trigger: str = "sample_input") -> RulesReport:
    """Apply TensorRT's Q/DQ placement rules to a model instrumented by :func:`trt_qat.quantize`, in place.

    Args:
        model (nn.Module): the quantized model (modified in place).
        sample_input (torch.Tensor | tuple): an example input; only its shape matters (values are not used for
            any decision), so zeros of the deployment shape are fine.
        skip (Iterable[str]): ``QuantConfig.skip`` regexes. A residual Add's skip-input quantizer would live at
            ``<producer module>._trt_qat_output_quantizers`` (the name sensitivity analysis reports it under); a
            pattern that contains ``_trt_qat_output_quantizers`` and matches that name leaves the Add alone.
            Defaults to none.
        trigger (str): what made the rules run, for the report ("sample_input" or "first forward"). Defaults to
            "sample_input".

    Returns:
        RulesReport: what was shared and quantized. Also stored as ``model.trt_qat_rules_report``.

    Raises:
        TrtQatError: when the model cannot run the sample input.
    """
    if getattr(model, "trt_qat_rules_report", None) is not None:
        LOG.info("placement rules were already applied to this model; leaving it as it is")
        return model.trt_qat_rules_report
    if not isinstance(sample_input, (torch.Tensor, tuple, list)):
        raise TrtQatError(f"apply_rules() needs a sample input tensor, got {type(sample_input).__name__}")
    # only patterns that name the output quantizers: a pattern for a block or a conv ("cv1", "stage2\.m\.0") keeps
    # matching what it matched before, and saved skip lists rebuild the same model
    skip_patterns = [re.compile(p) for p in skip if OUTPUTS_ATTR in p]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(sample_input, torch.Tensor):
        sample = sample_input.to(device)
    else:
        sample = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in sample_input)
    names = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)
    report = RulesReport(input_quantizers_before=count_act_quantizers(model), trigger=trigger)

    plan = Plan(trace(model, sample, names), names)
    restored = _restore_unused_layers(model, plan, report)
    slots = [n for n in slot_nodes(plan.rec) if id(n.module) not in restored]
    _merge_same_scale(plan, slots)
    class_q = _share_group_quantizers(plan, slots, report)
    _count_shared_ops(plan, class_q, report)
    sites = Sites()
    quantize_residual_adds(model, plan, class_q, skip_patterns, report, sites)
    quantize_matmul_inputs(model, plan, class_q, skip_patterns, report, sites)
    follow_data_movement(plan, sites.values)
    fold_input_quantizers(slots, sites.values, report)
    if install(plan, sites, report):
        model.register_forward_pre_hook(ResetCallCounters())

    report.input_quantizers_after = count_act_quantizers(model)
    report.input_shape = list(sample.shape) if isinstance(sample, torch.Tensor) else None
    model.trt_qat_rules_input_shape = report.input_shape
    model.trt_qat_rules_report = report
    LOG.info("placement rules (%s): %d groups merged, %d concats, %d maxpools, %d resizes shared; %d residual "
             "adds quantized, %d left alone; %d attention matmuls INT8; %d layers that do not run in eval left "
             "float", trigger, report.groups_merged, report.concats, report.maxpools, report.resizes,
             report.adds_quantized, len(report.adds_left_alone), report.matmuls_quantized, len(report.left_float))
    return report
