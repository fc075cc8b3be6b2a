"""TensorRT Q/DQ placement rules derived from the model's own dataflow, with no per-model configuration.

:func:`apply_rules` runs one forward of a sample input (eval mode, no grad, quantizers off) while recording

* every torch function and Tensor method called outside a leaf module (``torch.cat``, ``+``, ``view``,
  ``F.max_pool2d``, ``F.interpolate``, ...) through a :class:`torch.overrides.TorchFunctionMode`;
* every module call (forward pre/post hooks), with its call index, since one module may run several times
  per forward (torchvision ResNet's ``self.relu``, SPPF's ``self.m``).

Tensors are identified by ``id()`` (all are kept alive during the trace) and versioned, so in-place ops
(``out += identity``, ``ReLU(inplace=True)``) are followed correctly. From that graph:

1. **Same scale.** Input quantizers are grouped with a union-find over tensors: quantizers reading one tensor
   (fan-out), the inputs and output of a Concat, the input and output of MaxPool and nearest Resize/Upsample,
   and ops that only move data (view, reshape, permute, slicing, ...). Each group gets ONE shared
   :class:`~trt_qat.quantize.TrtQuantizer`, so TensorRT can drop the DQ->Q pairs around them.
2. **Residual Add.** For an Add of two same-shape activations where a quantized conv/linear produces one
   input, the skip input (the one the other depends on) is quantized at its producer by an *output
   quantizer* (a registered submodule applied by a forward hook), which is the group's quantizer when the
   tensor is also read by quantized layers. The conv-branch input stays float, so TensorRT fuses the Add
   into that conv's epilogue. Input quantizers that only read tensors already quantized that way are replaced
   by :class:`QuantizedUpstream` (a pass-through), so the ONNX has exactly one Q/DQ pair on the skip path.

The result is deterministic: ``load_quantized`` re-runs the same rules on a fresh model before loading the
state dict, so shared quantizers stay shared through calibration, QAT, save/load and export.
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict

import torch
from torch import nn

from trt_qat.errors import LOG, TrtQatError

__all__ = ["RulesReport", "apply_rules", "QuantizedUpstream", "OutputQuantHook", "ResetCallCounters"]

# torch functions / Tensor methods (by __name__) that only move data: same scale on both sides.
MOVE_FUNCS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "swapaxes",
    "movedim", "squeeze", "unsqueeze", "contiguous", "__getitem__", "narrow", "select", "chunk", "split",
    "tensor_split", "unbind", "expand", "expand_as", "clone", "detach", "pixel_shuffle", "pixel_unshuffle",
    "channel_shuffle", "identity",
})
MAXPOOL_FUNCS = frozenset({"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                           "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
                           "max_pool3d_with_indices"})
RESIZE_FUNCS = frozenset({"interpolate", "upsample", "upsample_nearest", "upsample_nearest1d", "upsample_nearest2d",
                          "upsample_nearest3d"})
CONCAT_FUNCS = frozenset({"cat", "concat", "concatenate", "stack"})
ADD_FUNCS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})
# pointwise functions TensorRT fuses into a conv epilogue (walked through to find the conv branch of an Add)
EPILOGUE_FUNCS = frozenset({"relu", "relu_", "relu6", "silu", "silu_", "gelu", "sigmoid", "sigmoid_", "hardswish",
                            "hardswish_", "hardsigmoid", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_",
                            "mish", "elu", "elu_", "tanh", "batch_norm", "mul", "__mul__", "mul_", "dropout",
                            "contiguous"})
EPILOGUE_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                    nn.LeakyReLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Mish, nn.ELU, nn.PReLU, nn.Hardtanh,
                    nn.Identity, nn.Dropout)
MOVE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.PixelShuffle,
                nn.PixelUnshuffle, nn.ChannelShuffle)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                   nn.AdaptiveMaxPool3d)
OUTPUTS_ATTR = "_trt_qat_output_quantizers"
CALLS_ATTR = "_trt_qat_calls"
_FAN_LIMIT = 200_000


def _tensor_quantizer_cls():
    from pytorch_quantization.nn import TensorQuantizer

    return TensorQuantizer


# --------------------------------------------------------------------------------------------- public modules
class QuantizedUpstream(nn.Module):
    """Stands in for a layer's input quantizer when its input is already quantized upstream by the same
    (shared) quantizer, applied as an output quantizer on the producing module.

    It returns its input unchanged, so the exported ONNX has one Q/DQ pair on that tensor instead of two.
    Attribute reads it does not have (``amax``, ``disable()``, ...) go to the shared quantizer, which is not a
    submodule here (it is registered at its producer), so calibration and state dicts see it once.

    Args:
        shared (TensorQuantizer): the quantizer applied upstream.
    """

    def __init__(self, shared: nn.Module):
        super().__init__()
        object.__setattr__(self, "_shared", shared)

    @property
    def shared(self) -> nn.Module:
        return self.__dict__["_shared"]

    def forward(self, x):
        return x

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            shared = self.__dict__.get("_shared")
            if shared is None or name.startswith("__"):
                raise
            return getattr(shared, name)

    def extra_repr(self) -> str:
        return f"quantized upstream by a shared {type(self.shared).__name__}"


def _replace_at(obj, pos, fn):
    """``obj`` with the tensor at nested position ``pos`` (tuple of indices/keys) replaced by ``fn(tensor)``."""
    if not pos:
        return fn(obj)
    head, rest = pos[0], pos[1:]
    if isinstance(obj, dict):
        new = type(obj)(obj) if not isinstance(obj, OrderedDict) else OrderedDict(obj)
        new[head] = _replace_at(obj[head], rest, fn)
        return new
    items = list(obj)
    items[head] = _replace_at(items[head], rest, fn)
    if isinstance(obj, list):
        return items
    if type(obj) is tuple:
        return tuple(items)
    try:  # namedtuple-like
        return type(obj)(*items)
    except TypeError:
        return tuple(items)


class OutputQuantHook:
    """Forward hook applying a module's output quantizers (``module._trt_qat_output_quantizers[key]``) on the
    calls they belong to. One instance per module; a plain class so that the model stays picklable.

    Args:
        calls_per_forward (int): how many times the module runs in one forward (the call index wraps around).
        plan (dict[int, list[tuple[tuple, str]]]): call index -> [(output position, ModuleDict key)].
    """

    def __init__(self, calls_per_forward: int, plan: dict):
        self.calls_per_forward = max(int(calls_per_forward), 1)
        self.plan = {int(k): [(tuple(p), str(key)) for p, key in v] for k, v in plan.items()}

    def __call__(self, module, args, output):
        idx = module.__dict__.get(CALLS_ATTR, 0) % self.calls_per_forward
        module.__dict__[CALLS_ATTR] = idx + 1
        entries = self.plan.get(idx)
        if not entries:
            return None
        quantizers = module._modules[OUTPUTS_ATTR]
        for pos, key in entries:
            output = _replace_at(output, pos, quantizers[key])
        return output


class ResetCallCounters:
    """Forward pre-hook on the root model: resets the call counters of modules with output quantizers."""

    def __call__(self, module, args):
        for m in module.modules():
            if CALLS_ATTR in m.__dict__:
                m.__dict__[CALLS_ATTR] = 0
        return None


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
        inputs_folded (int): input quantizers replaced by :class:`QuantizedUpstream` (no double Q/DQ).
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


# ----------------------------------------------------------------------------------------------- the trace
class _Value:
    __slots__ = ("idx", "producer", "shape", "is_float", "kind", "consumers")

    def __init__(self, idx, producer, tensor, kind):
        self.idx = idx
        self.producer = producer  # node index or None (model input, parameter, constant)
        self.shape = tuple(tensor.shape)
        self.is_float = tensor.is_floating_point()
        self.kind = kind  # "op", "input" or "const"
        self.consumers = []


class _Node:
    __slots__ = ("idx", "kind", "name", "module", "call", "inputs", "outputs", "scope", "args", "kwargs")

    def __init__(self, idx, kind, name, module, call, inputs, scope, args=None, kwargs=None):
        self.idx = idx
        self.kind = kind  # "module" or "function"
        self.name = name  # module class name or function name
        self.module = module
        self.call = call
        self.inputs = inputs
        self.outputs = []
        self.scope = scope
        self.args = args
        self.kwargs = kwargs


def _flatten(obj, pos=()):
    if isinstance(obj, torch.Tensor):
        yield pos, obj
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _flatten(item, pos + (i,))
    elif isinstance(obj, dict):
        for k, item in obj.items():
            yield from _flatten(item, pos + (k,))


def _is_opaque(module: nn.Module, tq_cls) -> bool:
    """Modules recorded as one node: quantizers, quantized layers and leaf modules."""
    if isinstance(module, (tq_cls, QuantizedUpstream)):
        return True
    if isinstance(module.__dict__.get("_modules", {}).get("_input_quantizer"), nn.Module):
        return True
    if isinstance(module.__dict__.get("_modules", {}).get("_weight_quantizer"), nn.Module):
        return True
    return not module._modules


class _Recorder(torch.overrides.TorchFunctionMode):
    """Records the dataflow of one forward: function calls outside leaf modules and every module call."""

    def __init__(self, model: nn.Module, names: dict):
        super().__init__()
        self.tq_cls = _tensor_quantizer_cls()
        self.model = model
        self.names = names
        self.values: list[_Value] = []
        self.nodes: list[_Node] = []
        self.current = {}  # id(tensor) -> value index (latest version)
        self.keep = []  # keeps every seen tensor alive so that id() stays unique
        self.calls = {}  # id(module) -> calls so far
        self.stack = []  # (module, call, node or None, opaque)
        self.opaque_depth = 0
        self.returns = {}  # value index -> [(module, call, pos, boundary node index)]
        self.handles = []

    # -- values
    def value_of(self, t: torch.Tensor, kind="const") -> int:
        v = self.current.get(id(t))
        if v is None:
            v = self._new(t, None, kind)
        return v

    def _new(self, t, producer, kind):
        v = len(self.values)
        self.values.append(_Value(v, producer, t, kind))
        self.current[id(t)] = v
        self.keep.append(t)
        return v

    def _add_node(self, kind, name, module, call, tensors, args=None, kwargs=None):
        idx = len(self.nodes)
        inputs = [self.value_of(t) for t in tensors]
        scope = self.names.get(id(self.stack[-1][0]), "") if self.stack else ""
        node = _Node(idx, kind, name, module, call, inputs, scope, args, kwargs)
        self.nodes.append(node)
        for v in inputs:
            self.values[v].consumers.append(idx)
        return node

    # -- functions
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque_depth == 0:
            outs = list(_flatten(out))
            if not outs and getattr(func, "__name__", "") == "__setitem__" and isinstance(args[0], torch.Tensor):
                outs = [((), args[0])]  # an in-place write: the target tensor gets a new version
            if outs:
                name = getattr(func, "__name__", str(func))
                ins = [t for _, t in _flatten((args, kwargs))]
                node = self._add_node("function", name, None, None, ins, args, kwargs)
                for _, t in outs:
                    node.outputs.append(self._new(t, node.idx, "op"))
        return out

    # -- modules
    def pre_hook(self, module, args):
        call = self.calls.get(id(module), 0)
        self.calls[id(module)] = call + 1
        if self.opaque_depth > 0:
            self.stack.append((module, call, None, False))
            return None
        if module is self.model:
            for _, t in _flatten(args):
                self.value_of(t, kind="input")
        node = None
        opaque = _is_opaque(module, self.tq_cls)
        if opaque:
            node = self._add_node("module", type(module).__name__, module, call, [t for _, t in _flatten(args)])
            self.opaque_depth += 1
        self.stack.append((module, call, node, opaque))
        return None

    def post_hook(self, module, args, output):
        mod, call, node, opaque = self.stack.pop()
        if mod is not module:  # pragma: no cover - hooks are strictly nested
            raise TrtQatError("module hooks out of order while tracing the dataflow; apply the rules with "
                              "QuantConfig(rules=False) and report this model")
        if opaque:
            self.opaque_depth -= 1
            for pos, t in _flatten(output):
                v = self._new(t, node.idx, "op")
                node.outputs.append(v)
                self.returns.setdefault(v, []).append((module, call, pos, node.idx + 1))
        elif node is None and self.opaque_depth == 0:  # a container module: it passes values on
            for pos, t in _flatten(output):
                v = self.current.get(id(t))
                if v is not None:
                    self.returns.setdefault(v, []).append((module, call, pos, len(self.nodes)))
        return None

    def install(self):
        for m in self.model.modules():
            self.handles.append(m.register_forward_pre_hook(self.pre_hook))
            self.handles.append(m.register_forward_hook(self.post_hook))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _trace(model: nn.Module, sample, names) -> _Recorder:
    tq_cls = _tensor_quantizer_cls()
    quantizers = [m for m in model.modules() if isinstance(m, tq_cls)]
    saved = [q._disabled for q in quantizers]
    was_training = model.training
    rec = _Recorder(model, names)
    args = tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)
    try:
        for q in quantizers:
            q._disabled = True
        model.eval()
        rec.install()
        with torch.no_grad(), rec:
            model(*args)
    except TrtQatError:
        raise
    except Exception as exc:
        raise TrtQatError(f"tracing the model's dataflow for the placement rules failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); check that the sample input "
                          "fits the model, or use QuantConfig(rules=False)") from None
    finally:
        rec.remove()
        for q, d in zip(quantizers, saved):
            q._disabled = d
        model.train(was_training)
    return rec


# ------------------------------------------------------------------------------------------------ analysis
class _UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, x):
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller index (earlier in the trace) stays the root: deterministic
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def _func_mode(node) -> str:
    """The interpolation mode of an F.interpolate/upsample call (positional arg 3 or keyword)."""
    if node.kwargs and "mode" in node.kwargs:
        return str(node.kwargs["mode"])
    if node.args and len(node.args) > 3 and isinstance(node.args[3], str):
        return node.args[3]
    return "nearest"


def _pad_is_zero(node) -> bool:
    mode = (node.kwargs or {}).get("mode", node.args[2] if node.args and len(node.args) > 2 else "constant")
    value = (node.kwargs or {}).get("value", node.args[3] if node.args and len(node.args) > 3 else None)
    return mode == "constant" and (value is None or value == 0)


def _category(node) -> str:
    """"move", "maxpool", "resize", "concat", "add" or "other"."""
    if node.kind == "module":
        m = node.module
        if isinstance(m, MAXPOOL_MODULES):
            return "maxpool"
        if isinstance(m, nn.Upsample):
            return "resize" if str(m.mode).startswith("nearest") else "other"
        if isinstance(m, MOVE_MODULES):
            return "move"
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
            return "move" if float(m.value) == 0.0 else "other"
        return "other"
    name = node.name
    if name in MOVE_FUNCS:
        return "move"
    if name == "pad":
        return "move" if _pad_is_zero(node) else "other"
    if name in MAXPOOL_FUNCS:
        return "maxpool"
    if name in RESIZE_FUNCS:
        return "resize" if _func_mode(node).startswith("nearest") else "other"
    if name in CONCAT_FUNCS:
        return "concat"
    if name in ADD_FUNCS:
        return "add"
    return "other"


class _Plan:
    def __init__(self, rec: _Recorder, names: dict):
        self.rec = rec
        self.names = names
        self.uf = _UnionFind(len(rec.values))
        self.categories = [_category(n) for n in rec.nodes]

    def name(self, module) -> str:
        return self.names.get(id(module), type(module).__name__) or "<model>"


def _first_float(values, idxs):
    return [v for v in idxs if values[v].is_float]


def _slot_nodes(rec: _Recorder, tq_cls):
    """Module nodes whose module has an enabled TensorQuantizer ``_input_quantizer``."""
    out = []
    for node in rec.nodes:
        if node.kind != "module" or not node.inputs:
            continue
        q = node.module._modules.get("_input_quantizer")
        if isinstance(q, tq_cls) and not q._disabled:
            out.append(node)
    return out


def _from_quantized_weighted(rec: _Recorder, v: int, tq_cls) -> bool:
    """True when value ``v`` is a quantized conv/linear output, possibly through fusable pointwise ops."""
    for _ in range(8):
        p = rec.values[v].producer
        if p is None:
            return False
        node = rec.nodes[p]
        if node.kind == "module":
            wq = node.module._modules.get("_weight_quantizer")
            if isinstance(wq, tq_cls) and not wq._disabled:
                return True
            if not isinstance(node.module, EPILOGUE_MODULES):
                return False
        elif node.name not in EPILOGUE_FUNCS:
            return False
        if not node.inputs:
            return False
        v = node.inputs[0]
    return False


def _is_ancestor(rec: _Recorder, a: int, b: int) -> bool:
    """True when value ``a`` is an ancestor of value ``b`` in the recorded graph."""
    pa = rec.values[a].producer
    floor = -1 if pa is None else pa
    seen, todo, steps = {b}, [b], 0
    while todo:
        v = todo.pop()
        if v == a:
            return True
        p = rec.values[v].producer
        if p is None or p <= floor:
            continue
        steps += 1
        if steps > _FAN_LIMIT:  # pragma: no cover - absurdly large graphs
            return False
        for u in rec.nodes[p].inputs:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def _order(rec: _Recorder, v: int) -> int:
    p = rec.values[v].producer
    return -1 if p is None else p


def _producer_site(rec: _Recorder, v: int):
    """(module, call, pos) of the innermost module returning value ``v`` before anything reads it, else None."""
    consumers = rec.values[v].consumers
    first_use = min(consumers) if consumers else len(rec.nodes)
    for module, call, pos, boundary in rec.returns.get(v, []):
        if first_use >= boundary:
            return module, call, pos
    return None


def _where(plan: _Plan, node) -> str:
    scope = node.scope or "<model>"
    return f"{scope} ({node.name})"


def _quant_params(model, tq_cls):
    for m in model.modules():
        if isinstance(m, tq_cls) and getattr(m, "role", "input") != "weight":
            nb = getattr(getattr(m, "_calibrator", None), "num_bins", 2048)
            return int(m._num_bits), int(nb)
    return 8, 2048


def _count_act_quantizers(model, tq_cls) -> int:
    seen = set()
    for m in model.modules():
        if isinstance(m, tq_cls) and getattr(m, "role", "input") != "weight":
            seen.add(id(m))
    return len(seen)


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
    from trt_qat.quant.quantizer import TrtQuantizer

    if getattr(model, "trt_qat_rules_report", None) is not None:
        LOG.info("placement rules were already applied to this model; leaving it as it is")
        return model.trt_qat_rules_report
    if not isinstance(sample_input, (torch.Tensor, tuple, list)):
        raise TrtQatError(f"apply_rules() needs a sample input tensor, got {type(sample_input).__name__}")
    tq_cls = _tensor_quantizer_cls()
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
    report = RulesReport(input_quantizers_before=_count_act_quantizers(model, tq_cls))

    rec = _trace(model, sample, names)
    plan = _Plan(rec, names)
    values, nodes, uf = rec.values, rec.nodes, plan.uf

    # 1. same-scale classes over values
    slots = _slot_nodes(rec, tq_cls)
    first_value_of_q = {}
    for node in slots:
        q = node.module._modules["_input_quantizer"]
        v = node.inputs[0]
        if id(q) in first_value_of_q:
            uf.union(first_value_of_q[id(q)], v)  # one module (one quantizer) run on several tensors
        else:
            first_value_of_q[id(q)] = v
    for node, cat in zip(nodes, plan.categories):
        if cat in ("move", "maxpool", "resize"):
            ins = _first_float(values, node.inputs[:1])
            for v in _first_float(values, node.outputs):
                for u in ins:
                    uf.union(u, v)
        elif cat == "concat":
            members = _first_float(values, node.inputs) + _first_float(values, node.outputs)
            for v in members[1:]:
                uf.union(members[0], v)

    # 2. one quantizer per class: the first slot's in trace order
    class_q = {}
    members = OrderedDict()
    for node in slots:
        c = uf.find(node.inputs[0])
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
    counters = {"concat": "concats", "maxpool": "maxpools", "resize": "resizes"}
    for node, cat in zip(nodes, plan.categories):
        if cat in counters and node.outputs and uf.find(node.outputs[0]) in class_q:
            setattr(report, counters[cat], getattr(report, counters[cat]) + 1)

    # 3. residual adds: quantize the skip input at its producer
    num_bits, num_bins = _quant_params(model, tq_cls)
    sites = OrderedDict()  # (id(module), call, pos) -> (module, call, pos, quantizer)
    quantized_values = {}  # value -> quantizer applied by an output quantizer
    for node, cat in zip(nodes, plan.categories):
        if cat != "add" or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        a, b = node.inputs
        va, vb = values[a], values[b]
        if a == b or not (va.is_float and vb.is_float) or va.shape != vb.shape:
            continue  # x + x, broadcasting (bias, grid) or non-float adds are not residual connections
        if va.kind == "const" or vb.kind == "const":
            continue  # a parameter or constant: not a residual connection
        fa, fb = _from_quantized_weighted(rec, a, tq_cls), _from_quantized_weighted(rec, b, tq_cls)
        if not (fa or fb):
            reason = "no input comes from a quantized conv/linear, so there is no epilogue to fuse it into"
            report.adds_left_alone.append((_where(plan, node), reason))
            LOG.info("placement rules: add in %s left alone: %s", _where(plan, node), reason)
            continue
        if _is_ancestor(rec, a, b):
            skip_v, other = a, b
        elif _is_ancestor(rec, b, a):
            skip_v, other = b, a
        else:
            skip_v, other = (a, b) if _order(rec, a) <= _order(rec, b) else (b, a)
        if not _from_quantized_weighted(rec, other, tq_cls):
            skip_v, other = other, skip_v
        if skip_v in quantized_values:
            report.adds_quantized += 1
            continue
        prod = values[skip_v].producer
        if prod is not None and isinstance(nodes[prod].module, tq_cls) and not nodes[prod].module._disabled:
            report.adds_quantized += 1  # the model quantizes the skip tensor itself (a TensorQuantizer in forward)
            continue
        site = _producer_site(rec, skip_v)
        if site is not None and skip_patterns:
            owner = plan.name(site[0])
            hit = next((p.pattern for p in skip_patterns if p.search(f"{owner}.{OUTPUTS_ATTR}")), None)
            if hit is not None:
                reason = f"quant.skip '{hit}' matches its skip-input quantizer at {owner}.{OUTPUTS_ATTR}"
                report.adds_left_alone.append((_where(plan, node), reason))
                LOG.info("placement rules: residual add in %s left alone: %s", _where(plan, node), reason)
                continue
        if site is None:
            what = "the model input" if prod is None else f"the functional op '{nodes[prod].name}'"
            reason = (f"its skip input is produced by {what}, not by a module, so no output quantizer can be "
                      "attached; produce it with a module (e.g. nn.ReLU instead of F.relu) to quantize it")
            report.adds_left_alone.append((_where(plan, node), reason))
            LOG.warning("placement rules: residual add in %s left alone: %s", _where(plan, node), reason)
            continue
        c = uf.find(skip_v)
        q = class_q.get(c)
        if q is None:
            q = TrtQuantizer(None, num_bits, num_bins, "input")
            class_q[c] = q
        module, call, pos = site
        sites[(id(module), call, pos)] = (module, call, pos, q)
        quantized_values[skip_v] = q
        report.adds_quantized += 1

    # a pure data-movement op (view, slice, ...) of a quantized tensor is quantized too
    for node, cat in zip(nodes, plan.categories):
        if cat == "move" and node.inputs and node.inputs[0] in quantized_values:
            for v in _first_float(values, node.outputs):
                quantized_values[v] = quantized_values[node.inputs[0]]

    # 4. fold input quantizers reading only tensors already quantized upstream by the same quantizer
    consumed = OrderedDict()  # id(module) -> (module, [values])
    for node in slots:
        consumed.setdefault(id(node.module), (node.module, []))[1].append(node.inputs[0])
    for module, vals in consumed.values():
        q = module._modules["_input_quantizer"]
        if all(quantized_values.get(v) is q for v in vals):
            module._input_quantizer = QuantizedUpstream(q)
            report.inputs_folded += 1

    # 5. install the output quantizers
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
        module.register_forward_hook(OutputQuantHook(rec.calls.get(id(module), 1), hook_plan))
    report.output_quantizers = len(sites)
    if sites:
        model.register_forward_pre_hook(ResetCallCounters())

    report.input_quantizers_after = _count_act_quantizers(model, tq_cls)
    model.trt_qat_rules_input_shape = list(sample.shape) if isinstance(sample, torch.Tensor) else None
    model.trt_qat_rules_report = report
    LOG.info("placement rules: %d groups merged, %d concats, %d maxpools, %d resizes shared; %d residual adds "
             "quantized, %d left alone", report.groups_merged, report.concats, report.maxpools, report.resizes,
             report.adds_quantized, len(report.adds_left_alone))
    return report
