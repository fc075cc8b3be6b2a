"""Where the placement rules (:mod:`trt_qat.quant.rules`) put Q/DQ pairs that no layer's input quantizer provides:
the skip input of a residual Add, and both inputs of a MatMul of two activations (attention), and how they are
installed.

A tensor is quantized where it is produced:

* at the innermost **module** that returns it (an *output quantizer*, :class:`~trt_qat.quant.hooks.OutputQuantHook`);
* when it is cut out of a module's output by data-movement ops (``chunk``, ``split``, ``view``, slicing), at that
  module: Q/DQ commute with those ops, so one scale serves every slice;
* when no module produces it (``q @ k``, ``softmax``, the running sum ``x + attn(x)``), at the **torch function**
  that does, inside the forward of the module that calls it (:mod:`trt_qat.quant.functional`).

The quantizer is the one of the tensor's same-scale class (:func:`trt_qat.quant.rules.apply_rules`, step 1) when
layers read that class, so those layers' input quantizers fold into it (one Q/DQ pair on the tensor), else a new
one.
"""
from __future__ import annotations

from collections import OrderedDict

from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from trt_qat.errors import LOG
from trt_qat.quant.functional import FUNCS_ATTR, FunctionQuantHooks
from trt_qat.quant.hooks import CALLS_ATTR, OUTPUTS_ATTR, OutputQuantHook, QuantizedUpstream
from trt_qat.quant.plan import Plan, RulesReport, function_site, quant_params, where
from trt_qat.quant.quantizer import TrtQuantizer
from trt_qat.quant.trace import (
    first_float,
    from_quantized_weighted,
    is_ancestor,
    producer_index,
    producer_site,
)

__all__ = ["Sites", "quantize_residual_adds", "quantize_matmul_inputs", "follow_data_movement",
           "fold_input_quantizers", "install"]


class Sites:
    """The quantizers the steps place: ``modules`` ``{(id(module), call, pos): (module, call, pos, q)}``,
    ``functions`` ``{(id(scope), call, name, ordinal, pos): (scope, call, name, ordinal, pos, q)}``, and
    ``values`` ``{value: quantizer applied to it}``."""

    def __init__(self):
        self.modules = OrderedDict()
        self.functions = OrderedDict()
        self.values = {}


def _site(plan: Plan, v: int):
    """Where value ``v`` can be quantized: ``("module", (module, call, pos), src)``, ``("function", (scope, call,
    name, ordinal, pos), src)`` or ``(None, what produces it, src)``; ``src`` is the value quantized there (``v``,
    or the module/function output ``v`` is a slice or view of)."""
    rec = plan.rec
    site, src, prod = producer_site(rec, v), v, rec.values[v].producer
    # a tensor cut out of a module's output by a data-movement op (C2f's ``cv1(x).chunk(2, 1)``): quantize that
    # module's output instead; the slices then carry its scale (TensorRT moves the DQ across the split)
    while site is None and prod is not None and plan.categories[prod] == "move" and rec.nodes[prod].inputs:
        src = rec.nodes[prod].inputs[0]
        prod = rec.values[src].producer
        site = producer_site(rec, src)
    if site is not None:
        return "module", site, src
    fsite = function_site(rec, prod) if prod is not None else None
    if fsite is not None and src in rec.positions:
        return "function", (*fsite, rec.positions[src]), src
    return None, ("the model input" if prod is None else f"the op '{rec.nodes[prod].name}'"), src


def _skip_pattern_hit(plan: Plan, kind, site, skip_patterns) -> str | None:
    """Why a ``quant.skip`` pattern keeps the quantizer at ``site`` out, else None."""
    if kind is None or not skip_patterns:
        return None
    owner = plan.names.get(id(site[0]), "")
    attr = OUTPUTS_ATTR if kind == "module" else FUNCS_ATTR
    name = f"{owner}.{attr}" if owner else attr  # the name list_layers / sensitivity give that ModuleDict
    hit = next((p.pattern for p in skip_patterns if p.search(name)), None)
    return None if hit is None else f"quant.skip '{hit}' matches its quantizer at {name}"


def _place(model, plan: Plan, class_q: dict, sites: Sites, kind, site, src):
    """Quantize value ``src`` at ``site`` with its class's quantizer (a new one when no layer reads that class)."""
    c = plan.uf.find(src)
    q = class_q.get(c)
    if q is None:
        num_bits, num_bins = quant_params(model)
        q = class_q[c] = TrtQuantizer(None, num_bits, num_bins, "input")
    if kind == "module":
        module, call, pos = site
        sites.modules[(id(module), call, pos)] = (module, call, pos, q)
    else:
        scope, call, name, ordinal, pos = site
        sites.functions[(id(scope), call, name, ordinal, pos)] = (scope, call, name, ordinal, pos, q)
    sites.values[src] = q
    return q


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


def quantize_residual_adds(model, plan: Plan, class_q: dict, skip_patterns, report: RulesReport, sites: Sites):
    """Quantize each residual Add's skip input where it is produced (the conv-branch input stays float, so
    TensorRT fuses the Add into that conv's epilogue)."""
    rec = plan.rec
    for node, cat in zip(rec.nodes, plan.categories):
        pair = _residual_inputs(rec, node) if cat == "add" and plan.is_live(node) else None
        if pair is None:
            continue
        if not (from_quantized_weighted(rec, pair[0]) or from_quantized_weighted(rec, pair[1])):
            reason = "no input comes from a quantized conv/linear, so there is no epilogue to fuse it into"
            report.adds_left_alone.append((where(node), reason))
            LOG.info("placement rules: add in %s left alone: %s", where(node), reason)
            continue
        skip_v = _skip_input(rec, *pair)
        prod = rec.values[skip_v].producer
        prod_module = None if prod is None else rec.nodes[prod].module
        if skip_v in sites.values or (isinstance(prod_module, TensorQuantizer) and not prod_module._disabled):
            report.adds_quantized += 1  # already quantized (another Add), or by a TensorQuantizer in the forward
            continue
        kind, site, src = _site(plan, skip_v)
        reason = _skip_pattern_hit(plan, kind, site, skip_patterns)
        if reason is None and kind is None:
            reason = (f"its skip input is {site}, which no module or function call inside a module produces, so "
                      "no quantizer can be attached")
        if reason is not None:
            report.adds_left_alone.append((where(node), reason))
            LOG.info("placement rules: residual add in %s left alone: %s", where(node), reason)
            continue
        sites.values[skip_v] = _place(model, plan, class_q, sites, kind, site, src)
        report.adds_quantized += 1


def quantize_matmul_inputs(model, plan: Plan, class_q: dict, skip_patterns, report: RulesReport, sites: Sites):
    """Quantize both inputs of every MatMul of two activations (attention's ``q @ k`` and ``attn @ v``), so
    TensorRT runs it in INT8 instead of leaving a float island (with its reformats) inside an INT8 network.
    A MatMul with a constant operand (a weight) is left to the layer that owns it."""
    rec = plan.rec
    for node, cat in zip(rec.nodes, plan.categories):
        if cat != "matmul" or not plan.is_live(node):
            continue
        ins = first_float(rec.values, node.inputs)
        if len(ins) != 2 or any(rec.values[v].kind == "const" for v in ins):
            continue
        placed = []
        for v in ins:
            if v in sites.values:
                continue
            kind, site, src = _site(plan, v)
            if src in sites.values:
                sites.values[v] = sites.values[src]
                continue
            reason = _skip_pattern_hit(plan, kind, site, skip_patterns)
            if reason is None and kind is None:
                reason = f"an input is {site}, which no module or function call inside a module produces"
            if reason is not None:
                report.matmuls_left_alone.append((where(node), reason))
                LOG.info("placement rules: matmul in %s left in float: %s", where(node), reason)
                break
            placed.append((v, kind, site, src))
        else:
            for v, kind, site, src in placed:
                sites.values[v] = _place(model, plan, class_q, sites, kind, site, src)
            report.matmuls_quantized += 1


def follow_data_movement(plan: Plan, quantized_values: dict):
    """A pure data-movement op (view, slice, ...) of a quantized tensor is quantized too."""
    for node, cat in zip(plan.rec.nodes, plan.categories):
        if cat == "move" and node.inputs and node.inputs[0] in quantized_values:
            for v in first_float(plan.rec.values, node.outputs):
                quantized_values[v] = quantized_values[node.inputs[0]]


def fold_input_quantizers(slots, quantized_values: dict, report: RulesReport):
    """Fold input quantizers reading only tensors already quantized upstream by the same quantizer."""
    consumed = OrderedDict()  # id(module) -> (module, [values])
    for node in slots:
        consumed.setdefault(id(node.module), (node.module, []))[1].append(node.inputs[0])
    for module, vals in consumed.values():
        q = module._modules["_input_quantizer"]
        if all(quantized_values.get(v) is q for v in vals):
            module._input_quantizer = QuantizedUpstream(q)
            report.inputs_folded += 1


def _dict_on(module, attr) -> nn.ModuleDict:
    dct = module._modules.get(attr)
    if dct is None:
        dct = nn.ModuleDict()
        setattr(module, attr, dct)
    return dct


def install(plan: Plan, sites: Sites, report: RulesReport) -> bool:
    """Register the output and function-output quantizers with the hooks that apply them; returns whether any
    was installed (the root model then needs :class:`~trt_qat.quant.hooks.ResetCallCounters`)."""
    by_module = OrderedDict()
    for module, call, pos, q in sites.modules.values():
        by_module.setdefault(id(module), (module, []))[1].append((call, pos, q))
    for module, entries in by_module.values():
        dct = _dict_on(module, OUTPUTS_ATTR)
        hook_plan = {}
        for call, pos, q in entries:
            key = "_".join([str(call), *[str(p) for p in pos]])
            dct[key] = q
            hook_plan.setdefault(call, []).append((pos, key))
            report.output_sites.append(f"{plan.name(module)}[{call}]")
        module.__dict__[CALLS_ATTR] = 0
        module.register_forward_hook(OutputQuantHook(plan.rec.calls.get(id(module), 1), hook_plan))
    by_scope = OrderedDict()
    for scope, call, name, ordinal, pos, q in sites.functions.values():
        by_scope.setdefault(id(scope), (scope, []))[1].append((call, name, ordinal, pos, q))
    for scope, entries in by_scope.values():
        dct = _dict_on(scope, FUNCS_ATTR)
        hook_plan = {}
        for call, name, ordinal, pos, q in entries:
            tag = f"op{name.strip('_')}" if name.startswith("__") else name  # "x + y" and torch.add stay apart
            key = "_".join([str(call), tag, str(ordinal), *[str(p) for p in pos]])
            dct[key] = q
            hook_plan.setdefault(call, []).append((name, ordinal, pos, key))
            report.output_sites.append(f"{plan.name(scope)}[{call}].{name}#{ordinal}")
        FunctionQuantHooks(plan.rec.calls.get(id(scope), 1), hook_plan).install(scope)
    report.output_quantizers = len(sites.modules)
    report.function_quantizers = len(sites.functions)
    return bool(sites.modules or sites.functions)
