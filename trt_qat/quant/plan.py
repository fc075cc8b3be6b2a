"""What the placement rules (:mod:`trt_qat.quant.rules`) work on and what they report: :class:`Plan`, the recorded
dataflow with a union-find over its values, two queries of it (:func:`live_nodes`, :func:`function_site`), and
:class:`RulesReport`."""
from __future__ import annotations

import dataclasses

from pytorch_quantization.nn import TensorQuantizer

from trt_qat.quant.trace import Recorder, UnionFind, category

__all__ = ["RulesReport", "Plan", "where", "quant_params", "count_act_quantizers", "live_nodes", "function_site"]


@dataclasses.dataclass
class RulesReport:
    """What :func:`trt_qat.quant.rules.apply_rules` did.

    Args:
        input_quantizers_before (int): distinct activation quantizers before the rules.
        input_quantizers_after (int): distinct activation quantizers after (output quantizers included).
        groups_merged (int): same-scale groups that held more than one quantizer.
        quantizers_shared (int): layer input quantizers re-pointed to their group's shared quantizer.
        concats (int): Concat ops whose inputs and output now share one scale.
        maxpools (int): MaxPool ops with equal input and output scales.
        resizes (int): nearest Resize/Upsample ops with equal input and output scales.
        adds_quantized (int): residual Adds whose skip input is now quantized (fusable into the conv).
        matmuls_quantized (int): MatMuls of two activations (attention) with both inputs quantized.
        output_quantizers (int): output quantizers added on producing modules.
        function_quantizers (int): quantizers added on the output of a torch function called in a module's forward
            (:mod:`trt_qat.quant.functional`).
        inputs_folded (int): input quantizers replaced by :class:`~trt_qat.quant.hooks.QuantizedUpstream` (no
            double Q/DQ).
        adds_left_alone (list[tuple[str, str]]): ``(where, reason)`` for residual Adds not handled.
        matmuls_left_alone (list[tuple[str, str]]): ``(where, reason)`` for activation MatMuls left in float.
        left_float (list[tuple[str, str]]): ``(layer, reason)`` for quantized layers restored to float because they
            do not run in eval, or their output does not reach the model's output (a training-only branch).
        groups (list[list[str]]): for each merged group, the layers sharing one quantizer.
        output_sites (list[str]): ``"<module>[call]"`` for each output quantizer, ``"<module>[call].<function>#<n>"``
            for each function-output quantizer.
        trigger (str): how the rules ran: ``"sample_input"`` (given to quantize/apply_rules) or ``"first forward"``
            (the first batch the model saw, when quantize() had no sample input).
        input_shape (list[int] | None): the shape of the input the rules traced.
    """

    input_quantizers_before: int = 0
    input_quantizers_after: int = 0
    groups_merged: int = 0
    quantizers_shared: int = 0
    concats: int = 0
    maxpools: int = 0
    resizes: int = 0
    adds_quantized: int = 0
    matmuls_quantized: int = 0
    output_quantizers: int = 0
    function_quantizers: int = 0
    inputs_folded: int = 0
    adds_left_alone: list = dataclasses.field(default_factory=list)
    matmuls_left_alone: list = dataclasses.field(default_factory=list)
    left_float: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)
    output_sites: list = dataclasses.field(default_factory=list)
    trigger: str = "sample_input"
    input_shape: list | None = None

    def format(self) -> str:
        lines = [
            f"TensorRT placement rules (applied on the {self.trigger}, input {self.input_shape})",
            f"  activation quantizers     {self.input_quantizers_before} -> {self.input_quantizers_after}",
            f"  same-scale groups merged  {self.groups_merged} ({self.quantizers_shared} layer inputs re-pointed)",
            f"  concat / maxpool / resize {self.concats} / {self.maxpools} / {self.resizes} with shared scales",
            f"  residual adds quantized   {self.adds_quantized} ({self.output_quantizers} output quantizers, "
            f"{self.function_quantizers} on function outputs, {self.inputs_folded} input quantizers folded into "
            "them)",
            f"  attention matmuls INT8    {self.matmuls_quantized}",
            f"  residual adds left alone  {len(self.adds_left_alone)}",
        ]
        lines += [f"    - {where}: {reason}" for where, reason in self.adds_left_alone]
        if self.matmuls_left_alone:
            lines.append(f"  matmuls left in float     {len(self.matmuls_left_alone)}")
            lines += [f"    - {where}: {reason}" for where, reason in self.matmuls_left_alone]
        if self.left_float:
            lines.append(f"  layers restored to float  {len(self.left_float)}")
            lines += [f"    - {name}: {reason}" for name, reason in self.left_float]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Plan:
    """The trace with what the steps share: a union-find over its values and each node's category.

    Args:
        rec (Recorder): the recorded forward.
        names (dict[int, str]): ``id(module) -> qualified name``.
    """

    def __init__(self, rec: Recorder, names: dict):
        self.rec = rec
        self.names = names
        self.uf = UnionFind(len(rec.values))
        self.categories = [category(n) for n in rec.nodes]
        self.live = None  # node indices whose outputs reach the model output (None: all)

    def name(self, module) -> str:
        return self.names.get(id(module), type(module).__name__) or "<model>"

    def is_live(self, node) -> bool:
        return self.live is None or node.idx in self.live


def where(node) -> str:
    """``"<scope> (<op>)"``: where a node is, for reports."""
    return f"{node.scope or '<model>'} ({node.name})"


def quant_params(model):
    """``(num_bits, num_bins)`` of the model's activation quantizers (8, 2048 when it has none)."""
    for m in model.modules():
        if isinstance(m, TensorQuantizer) and getattr(m, "role", "input") != "weight":
            nb = getattr(getattr(m, "_calibrator", None), "num_bins", 2048)
            return int(m._num_bits), int(nb)
    return 8, 2048


def count_act_quantizers(model) -> int:
    """The number of distinct activation quantizers in ``model``."""
    seen = set()
    for m in model.modules():
        if isinstance(m, TensorQuantizer) and getattr(m, "role", "input") != "weight":
            seen.add(id(m))
    return len(seen)


def live_nodes(rec: Recorder) -> set:
    """The indices of the nodes whose outputs reach the model's outputs (the ones an ONNX export keeps)."""
    live, todo = set(), list(rec.outputs)
    seen = set(todo)
    while todo:
        p = rec.values[todo.pop()].producer
        if p is None or p in live:
            continue
        live.add(p)
        for u in rec.nodes[p].inputs:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return live


def function_site(rec: Recorder, p: int):
    """``(scope module, its call index, function name, ordinal)`` of function node ``p``: the ordinal counts the
    earlier calls of the same function with a floating-point output (under ``torch.jit`` tracing, shape
    arithmetic runs on integer tensors) in the same forward call of the same module (what
    :class:`trt_qat.quant.functional.FunctionQuantHooks` counts at run time); None when ``p`` is not a function
    called inside a module's forward."""
    node = rec.nodes[p]
    if node.kind != "function" or node.scope_module is None:
        return None
    ordinal = sum(1 for n in rec.nodes[:p] if n.kind == "function" and n.name == node.name
                  and n.scope_module is node.scope_module and n.scope_call == node.scope_call
                  and any(rec.values[o].is_float for o in n.outputs))
    return node.scope_module, node.scope_call, node.name, ordinal
