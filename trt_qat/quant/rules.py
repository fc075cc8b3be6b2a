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
   into that conv's epilogue. Input quantizers that only read tensors already quantized that way are replaced
   by :class:`~trt_qat.quant.hooks.QuantizedUpstream` (a pass-through), so the ONNX has exactly one Q/DQ pair
   on the skip path.

The result is deterministic: ``load_quantized`` re-runs the same rules on a fresh model before loading the
state dict, so shared quantizers stay shared through calibration, QAT, save/load and export.
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict

import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from trt_qat.errors import LOG, TrtQatError
from trt_qat.quant.hooks import CALLS_ATTR, OUTPUTS_ATTR, OutputQuantHook, QuantizedUpstream, ResetCallCounters
from trt_qat.quant.quantizer import TrtQuantizer
from trt_qat.quant.trace import (
    Recorder,
    UnionFind,
    category,
    first_float,
    from_quantized_weighted,
    is_ancestor,
    producer_index,
    producer_site,
    slot_nodes,
    trace,
)

__all__ = ["RulesReport", "apply_rules"]


# ------------------------------------------------------------------------------------------------ the report
@dataclasses.dataclass
class RulesReport:
    """What :func:`apply_rules` did.

    Args:
        input_quantizers_before (int): distinct activation quantizers before the rules.
        input_quantizers_after (int): distinct activation quantizers after (output quantizers included).
        groups_merged (int): same-scale groups that held more than one quantizer.
        quantizers_shared (int): layer input quantizers re-pointed to their group's shared quantizer.
        concats (int): Concat ops whose inputs and output now share one scale.
        maxpools (int): MaxPool ops with equal input and output scales.
        resizes (int): nearest Resize/Upsample ops with equal input and output scales.
        adds_quantized (int): residual Adds whose skip input is now quantized (fusable into the conv).
        output_quantizers (int): output quantizers added on producing modules.
        inputs_folded (int): input quantizers replaced by :class:`~trt_qat.quant.hooks.QuantizedUpstream` (no
            double Q/DQ).
        adds_left_alone (list[tuple[str, str]]): ``(where, reason)`` for residual Adds not handled.
        groups (list[list[str]]): for each merged group, the layers sharing one quantizer.
        output_sites (list[str]): ``"<module>[call]"`` for each output quantizer.
    """

    input_quantizers_before: int = 0
    input_quantizers_after: int = 0
    groups_merged: int = 0
    quantizers_shared: int = 0
    concats: int = 0
    maxpools: int = 0
    resizes: int = 0
    adds_quantized: int = 0
    output_quantizers: int = 0
    inputs_folded: int = 0
    adds_left_alone: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)
    output_sites: list = dataclasses.field(default_factory=list)

    def format(self) -> str:
        lines = [
            "TensorRT placement rules",
            f"  activation quantizers     {self.input_quantizers_before} -> {self.input_quantizers_after}",
            f"  same-scale groups merged  {self.groups_merged} ({self.quantizers_shared} layer inputs re-pointed)",
            f"  concat / maxpool / resize {self.concats} / {self.maxpools} / {self.resizes} with shared scales",
            f"  residual adds quantized   {self.adds_quantized} ({self.output_quantizers} output quantizers, "
            f"{self.inputs_folded} input quantizers folded into them)",
            f"  residual adds left alone  {len(self.adds_left_alone)}",
        ]
        for where, reason in self.adds_left_alone:
            lines.append(f"    - {where}: {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ helpers
class _Plan:
    """The trace with what the steps share: a union-find over its values and each node's category."""

    def __init__(self, rec: Recorder, names: dict):
        self.rec = rec
        self.names = names
        self.uf = UnionFind(len(rec.values))
        self.categories = [category(n) for n in rec.nodes]

    def name(self, module) -> str:
        return self.names.get(id(module), type(module).__name__) or "<model>"


def _where(plan: _Plan, node) -> str:
    scope = node.scope or "<model>"
    return f"{scope} ({node.name})"


def _quant_params(model):
    for m in model.modules():
        if isinstance(m, TensorQuantizer) and getattr(m, "role", "input") != "weight":
            nb = getattr(getattr(m, "_calibrator", None), "num_bins", 2048)
            return int(m._num_bits), int(nb)
    return 8, 2048


def _count_act_quantizers(model) -> int:
    seen = set()
    for m in model.modules():
        if isinstance(m, TensorQuantizer) and getattr(m, "role", "input") != "weight":
            seen.add(id(m))
    return len(seen)


def _residual_inputs(rec, node):
    """The two input values of an Add node that may be a residual connection, else None."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    va, vb = rec.values[a], rec.values[b]
    if a == b or not (va.is_float and vb.is_float) or va.shape != vb.shape:
        return None  # x + x, broadcasting (bias, grid) or non-float adds are not residual connections
    if va.kind == "const" or vb.kind == "const":
        return None  # a parameter or constant: not a residual connection
    return a, b


def _skip_input(rec, a: int, b: int) -> int:
    """The skip input of a residual Add of values ``a`` and ``b``: the one the other depends on (else the earlier
    one), unless the other does not come from a quantized conv/linear."""
    if is_ancestor(rec, a, b):
        skip_v, other = a, b
    elif is_ancestor(rec, b, a):
        skip_v, other = b, a
    else:
        skip_v, other = (a, b) if producer_index(rec, a) <= producer_index(rec, b) else (b, a)
    if not from_quantized_weighted(rec, other):
        skip_v, other = other, skip_v
    return skip_v


def _skip_pattern_hit(plan: _Plan, site, skip_patterns) -> str | None:
    """Why a ``quant.skip`` pattern keeps the output quantizer at ``site`` out, else None."""
    if site is None or not skip_patterns:
        return None
    owner = plan.name(site[0])
    hit = next((p.pattern for p in skip_patterns if p.search(f"{owner}.{OUTPUTS_ATTR}")), None)
    if hit is None:
        return None
    return f"quant.skip '{hit}' matches its skip-input quantizer at {owner}.{OUTPUTS_ATTR}"


# ------------------------------------------------------------------------------------------------ the steps
def _merge_same_scale(plan: _Plan, slots):
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


def _share_group_quantizers(plan: _Plan, slots, report: RulesReport) -> dict:
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


def _count_shared_ops(plan: _Plan, class_q: dict, report: RulesReport):
    """Count the Concat, MaxPool and Resize ops whose output class now has a quantizer."""
    counters = {"concat": "concats", "maxpool": "maxpools", "resize": "resizes"}
    for node, cat in zip(plan.rec.nodes, plan.categories):
        if cat in counters and node.outputs and plan.uf.find(node.outputs[0]) in class_q:
            setattr(report, counters[cat], getattr(report, counters[cat]) + 1)


def _quantize_residual_adds(model, plan: _Plan, class_q: dict, skip_patterns, report: RulesReport):
    """Step 3: quantize each residual Add's skip input at its producer, with its class's quantizer (a new one when
    no layer reads that class). Returns ``(sites, quantized_values)``: ``{(id(module), call, pos): (module, call,
    pos, quantizer)}`` and ``{value: quantizer applied by an output quantizer}``."""
    rec = plan.rec
    num_bits, num_bins = _quant_params(model)
    sites = OrderedDict()
    quantized_values = {}
    for node, cat in zip(rec.nodes, plan.categories):
        pair = _residual_inputs(rec, node) if cat == "add" else None
        if pair is None:
            continue
        if not (from_quantized_weighted(rec, pair[0]) or from_quantized_weighted(rec, pair[1])):
            reason = "no input comes from a quantized conv/linear, so there is no epilogue to fuse it into"
            report.adds_left_alone.append((_where(plan, node), reason))
            LOG.info("placement rules: add in %s left alone: %s", _where(plan, node), reason)
            continue
        skip_v = _skip_input(rec, *pair)
        if skip_v in quantized_values:
            report.adds_quantized += 1
            continue
        prod = rec.values[skip_v].producer
        prod_module = None if prod is None else rec.nodes[prod].module
        if isinstance(prod_module, TensorQuantizer) and not prod_module._disabled:
            report.adds_quantized += 1  # the model quantizes the skip tensor itself (a TensorQuantizer in forward)
            continue
        site, src = producer_site(rec, skip_v), skip_v
        # a skip input cut out of a module's output by a data-movement op (C2f's ``cv1(x).chunk(2, 1)``): quantize
        # that module's output instead; the slices then carry its scale (TensorRT moves the DQ across the split)
        while site is None and prod is not None and plan.categories[prod] == "move" and rec.nodes[prod].inputs:
            src = rec.nodes[prod].inputs[0]
            prod = rec.values[src].producer
            site = producer_site(rec, src)
        if site is None:
            prod = rec.values[skip_v].producer
        reason = _skip_pattern_hit(plan, site, skip_patterns)
        if reason is not None:
            report.adds_left_alone.append((_where(plan, node), reason))
            LOG.info("placement rules: residual add in %s left alone: %s", _where(plan, node), reason)
            continue
        if site is None:
            what = "the model input" if prod is None else f"the functional op '{rec.nodes[prod].name}'"
            reason = (f"its skip input is produced by {what}, not by a module, so no output quantizer can be "
                      "attached; produce it with a module (e.g. nn.ReLU instead of F.relu) to quantize it")
            report.adds_left_alone.append((_where(plan, node), reason))
            LOG.warning("placement rules: residual add in %s left alone: %s", _where(plan, node), reason)
            continue
        c = plan.uf.find(src)
        q = class_q.get(c)
        if q is None:
            q = TrtQuantizer(None, num_bits, num_bins, "input")
            class_q[c] = q
        module, call, pos = site
        sites[(id(module), call, pos)] = (module, call, pos, q)
        quantized_values[src] = quantized_values[skip_v] = q
        report.adds_quantized += 1
    return sites, quantized_values


def _follow_data_movement(plan: _Plan, quantized_values: dict):
    """A pure data-movement op (view, slice, ...) of a quantized tensor is quantized too."""
    for node, cat in zip(plan.rec.nodes, plan.categories):
        if cat == "move" and node.inputs and node.inputs[0] in quantized_values:
            for v in first_float(plan.rec.values, node.outputs):
                quantized_values[v] = quantized_values[node.inputs[0]]


def _fold_input_quantizers(slots, quantized_values: dict, report: RulesReport):
    """Step 4: fold input quantizers reading only tensors already quantized upstream by the same quantizer."""
    consumed = OrderedDict()  # id(module) -> (module, [values])
    for node in slots:
        consumed.setdefault(id(node.module), (node.module, []))[1].append(node.inputs[0])
    for module, vals in consumed.values():
        q = module._modules["_input_quantizer"]
        if all(quantized_values.get(v) is q for v in vals):
            module._input_quantizer = QuantizedUpstream(q)
            report.inputs_folded += 1


def _install_output_quantizers(model, plan: _Plan, sites: dict, report: RulesReport):
    """Step 5: register the output quantizers on their modules, with the hooks that apply them."""
    by_module = OrderedDict()
    for module, call, pos, q in sites.values():
        by_module.setdefault(id(module), (module, []))[1].append((call, pos, q))
    for module, entries in by_module.values():
        dct = module._modules.get(OUTPUTS_ATTR)
        if dct is None:
            dct = nn.ModuleDict()
            setattr(module, OUTPUTS_ATTR, dct)
        hook_plan = {}
        for call, pos, q in entries:
            key = "_".join([str(call), *[str(p) for p in pos]])
            dct[key] = q
            hook_plan.setdefault(call, []).append((pos, key))
            report.output_sites.append(f"{plan.name(module)}[{call}]")
        module.__dict__[CALLS_ATTR] = 0
        module.register_forward_hook(OutputQuantHook(plan.rec.calls.get(id(module), 1), hook_plan))
    report.output_quantizers = len(sites)
    if sites:
        model.register_forward_pre_hook(ResetCallCounters())


# ---------------------------------------------------------------------------------------------- entry point
def apply_rules(model: nn.Module, sample_input, skip=()) -> RulesReport:
    """Apply TensorRT's Q/DQ placement rules to a model instrumented by :func:`trt_qat.quantize`, in place.

    Args:
        model (nn.Module): the quantized model (modified in place).
        sample_input (torch.Tensor | tuple): an example input; only its shape matters (values are not used for
            any decision), so zeros of the deployment shape are fine.
        skip (Iterable[str]): ``QuantConfig.skip`` regexes. A residual Add's skip-input quantizer would live at
            ``<producer module>._trt_qat_output_quantizers`` (the name sensitivity analysis reports it under); a
            pattern that contains ``_trt_qat_output_quantizers`` and matches that name leaves the Add alone.
            Defaults to none.

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
    report = RulesReport(input_quantizers_before=_count_act_quantizers(model))

    plan = _Plan(trace(model, sample, names), names)
    slots = slot_nodes(plan.rec)
    _merge_same_scale(plan, slots)
    class_q = _share_group_quantizers(plan, slots, report)
    _count_shared_ops(plan, class_q, report)
    sites, quantized_values = _quantize_residual_adds(model, plan, class_q, skip_patterns, report)
    _follow_data_movement(plan, quantized_values)
    _fold_input_quantizers(slots, quantized_values, report)
    _install_output_quantizers(model, plan, sites, report)

    report.input_quantizers_after = _count_act_quantizers(model)
    model.trt_qat_rules_input_shape = list(sample.shape) if isinstance(sample, torch.Tensor) else None
    model.trt_qat_rules_report = report
    LOG.info("placement rules: %d groups merged, %d concats, %d maxpools, %d resizes shared; %d residual adds "
             "quantized, %d left alone", report.groups_merged, report.concats, report.maxpools, report.resizes,
             report.adds_quantized, len(report.adds_left_alone))
    return report
