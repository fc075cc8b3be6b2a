"""The dataflow of one forward, recorded for the TensorRT placement rules (:mod:`trt_qat.quant.rules`).

:func:`trace` runs one forward of a sample input (eval mode, no grad, quantizers off) while recording every torch
function and Tensor method called outside a leaf module (``torch.cat``, ``+``, ``view``, ``F.max_pool2d``, ...)
through a :class:`torch.overrides.TorchFunctionMode`, and every module call (forward pre/post hooks) with its call
index, since one module may run several times per forward (torchvision ResNet's ``self.relu``, SPPF's ``self.m``).
Tensors are identified by ``id()`` (all are kept alive during the trace) and versioned, so in-place ops
(``out += identity``, ``ReLU(inplace=True)``) are followed correctly. The queries below only read the trace.
"""
from __future__ import annotations

import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from trt_qat.errors import TrtQatError
from trt_qat.quant.hooks import QuantizedUpstream

__all__ = ["Recorder", "Value", "Node", "UnionFind", "trace", "flatten", "is_opaque", "category", "first_float",
           "slot_nodes", "from_quantized_weighted", "is_ancestor", "producer_index", "producer_site"]

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
MATMUL_FUNCS = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm"})
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
#: at most this many producer steps in one ancestry search
FAN_LIMIT = 200_000


# ------------------------------------------------------------------------------------------ values and nodes
class Value:
    """One version of one tensor: its producer node, shape, dtype class, kind and the nodes that read it."""

    __slots__ = ("idx", "producer", "shape", "is_float", "kind", "consumers")

    def __init__(self, idx, producer, tensor, kind):
        self.idx = idx
        self.producer = producer  # node index or None (model input, parameter, constant)
        self.shape = tuple(tensor.shape)
        self.is_float = tensor.is_floating_point()
        self.kind = kind  # "op", "input" or "const"
        self.consumers = []


class Node:
    """One recorded call: an opaque module call or a torch function, with its input and output value indices."""

    __slots__ = ("idx", "kind", "name", "module", "call", "inputs", "outputs", "scope", "args", "kwargs",
                 "scope_module", "scope_call")

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
        self.scope_module = None  # the module whose forward made this call, and that module's call index
        self.scope_call = None


def flatten(obj, pos=()):
    """Yield ``(position, tensor)`` for every tensor nested in lists, tuples and dicts (``position``: keys)."""
    if isinstance(obj, torch.Tensor):
        yield pos, obj
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from flatten(item, pos + (i,))
    elif isinstance(obj, dict):
        for k, item in obj.items():
            yield from flatten(item, pos + (k,))


def is_opaque(module: nn.Module) -> bool:
    """Modules recorded as one node: quantizers, quantized layers and leaf modules. A stateless leaf module that
    is not torch's own (Ultralytics' ``Concat``: ``torch.cat`` in a module) is traced through instead, so the ops
    it calls are seen (a Concat's inputs and output then share one scale)."""
    if isinstance(module, (TensorQuantizer, QuantizedUpstream)):
        return True
    if isinstance(module.__dict__.get("_modules", {}).get("_input_quantizer"), nn.Module):
        return True
    if isinstance(module.__dict__.get("_modules", {}).get("_weight_quantizer"), nn.Module):
        return True
    if module._modules:
        return False
    if type(module).__module__.split(".")[0] == "torch":
        return True
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


# ------------------------------------------------------------------------------------------------ the trace
class Recorder(torch.overrides.TorchFunctionMode):
    """Records the dataflow of one forward: function calls outside leaf modules and every module call.

    Args:
        model (nn.Module): the model to trace.
        names (dict[int, str]): ``id(module) -> qualified name``.
    """

    def __init__(self, model: nn.Module, names: dict):
        super().__init__()
        self.model = model
        self.names = names
        self.values: list[Value] = []
        self.nodes: list[Node] = []
        self.current = {}  # id(tensor) -> value index (latest version)
        self.keep = []  # keeps every seen tensor alive so that id() stays unique
        self.calls = {}  # id(module) -> calls so far
        self.stack = []  # (module, call, node or None, opaque)
        self.opaque_depth = 0
        self.returns = {}  # value index -> [(module, call, pos, boundary node index)]
        self.outputs = []  # the value indices the model returns
        self.positions = {}  # value index -> its position in the output of the function that produced it
        self.handles = []

    # -- values
    def value_of(self, t: torch.Tensor, kind="const") -> int:
        v = self.current.get(id(t))
        if v is None:
            v = self._new(t, None, kind)
        return v

    def _new(self, t, producer, kind):
        v = len(self.values)
        self.values.append(Value(v, producer, t, kind))
        self.current[id(t)] = v
        self.keep.append(t)
        return v

    def _add_node(self, kind, name, module, call, tensors, args=None, kwargs=None):
        idx = len(self.nodes)
        inputs = [self.value_of(t) for t in tensors]
        scope = self.names.get(id(self.stack[-1][0]), "") if self.stack else ""
        node = Node(idx, kind, name, module, call, inputs, scope, args, kwargs)
        if self.stack:
            node.scope_module, node.scope_call = self.stack[-1][0], self.stack[-1][1]
        self.nodes.append(node)
        for v in inputs:
            self.values[v].consumers.append(idx)
        return node

    # -- functions
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque_depth == 0:
            outs = list(flatten(out))
            if not outs and getattr(func, "__name__", "") == "__setitem__" and isinstance(args[0], torch.Tensor):
                outs = [((), args[0])]  # an in-place write: the target tensor gets a new version
            if outs:
                name = getattr(func, "__name__", str(func))
                ins = [t for _, t in flatten((args, kwargs))]
                node = self._add_node("function", name, None, None, ins, args, kwargs)
                for pos, t in outs:
                    node.outputs.append(self._new(t, node.idx, "op"))
                    self.positions[node.outputs[-1]] = pos
        return out

    # -- modules
    def pre_hook(self, module, args):
        call = self.calls.get(id(module), 0)
        self.calls[id(module)] = call + 1
        if self.opaque_depth > 0:
            self.stack.append((module, call, None, False))
            return None
        if module is self.model:
            for _, t in flatten(args):
                self.value_of(t, kind="input")
        node = None
        opaque = is_opaque(module)
        if opaque:
            node = self._add_node("module", type(module).__name__, module, call, [t for _, t in flatten(args)])
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
            for pos, t in flatten(output):
                v = self._new(t, node.idx, "op")
                node.outputs.append(v)
                self.returns.setdefault(v, []).append((module, call, pos, node.idx + 1))
        elif node is None and self.opaque_depth == 0:  # a container module: it passes values on
            for pos, t in flatten(output):
                v = self.current.get(id(t))
                if v is not None:
                    self.returns.setdefault(v, []).append((module, call, pos, len(self.nodes)))
        if module is self.model:
            self.outputs = [v for v in (self.current.get(id(t)) for _, t in flatten(output)) if v is not None]
        return None

    def install(self):
        for m in self.model.modules():
            self.handles.append(m.register_forward_pre_hook(self.pre_hook))
            self.handles.append(m.register_forward_hook(self.post_hook))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def trace(model: nn.Module, sample, names: dict) -> Recorder:
    """Record one forward of ``sample`` (eval mode, no grad, every quantizer disabled), then restore the model.

    Args:
        model (nn.Module): the model; ``sample`` (torch.Tensor | tuple) is its input, on the model's device.
        names (dict[int, str]): ``id(module) -> qualified name``.

    Returns:
        Recorder: the recorded dataflow.

    Raises:
        TrtQatError: when the model cannot run the sample input.
    """
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    saved = [q._disabled for q in quantizers]
    was_training = model.training
    rec = Recorder(model, names)
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


# ------------------------------------------------------------------------------------------------- queries
class UnionFind:
    """Union-find over ``n`` indices; the smaller index (earlier in the trace) stays the root."""

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


def category(node) -> str:
    """"move", "maxpool", "resize", "concat", "add", "matmul" or "other"."""
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
    if name in MATMUL_FUNCS:
        return "matmul"
    return "other"


def first_float(values, idxs):
    """The value indices among ``idxs`` that hold floating-point tensors."""
    return [v for v in idxs if values[v].is_float]


def slot_nodes(rec: Recorder):
    """Module nodes whose module has an enabled TensorQuantizer ``_input_quantizer``."""
    out = []
    for node in rec.nodes:
        if node.kind != "module" or not node.inputs:
            continue
        q = node.module._modules.get("_input_quantizer")
        if isinstance(q, TensorQuantizer) and not q._disabled:
            out.append(node)
    return out


def from_quantized_weighted(rec: Recorder, v: int) -> bool:
    """True when value ``v`` is a quantized conv/linear output, possibly through fusable pointwise ops."""
    for _ in range(8):
        p = rec.values[v].producer
        if p is None:
            return False
        node = rec.nodes[p]
        if node.kind == "module":
            wq = node.module._modules.get("_weight_quantizer")
            if isinstance(wq, TensorQuantizer) and not wq._disabled:
                return True
            if not isinstance(node.module, EPILOGUE_MODULES):
                return False
        elif node.name not in EPILOGUE_FUNCS:
            return False
        if not node.inputs:
            return False
        v = node.inputs[0]
    return False


def producer_index(rec: Recorder, v: int) -> int:
    """The index of the node producing value ``v``, or -1 for a model input, parameter or constant."""
    p = rec.values[v].producer
    return -1 if p is None else p


def is_ancestor(rec: Recorder, a: int, b: int) -> bool:
    """True when value ``a`` is an ancestor of value ``b`` in the recorded graph."""
    floor = producer_index(rec, a)
    seen, todo, steps = {b}, [b], 0
    while todo:
        v = todo.pop()
        if v == a:
            return True
        p = rec.values[v].producer
        if p is None or p <= floor:
            continue
        steps += 1
        if steps > FAN_LIMIT:  # pragma: no cover - absurdly large graphs
            return False
        for u in rec.nodes[p].inputs:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def producer_site(rec: Recorder, v: int):
    """(module, call, pos) of the innermost module returning value ``v`` before anything reads it, else None."""
    consumers = rec.values[v].consumers
    first_use = min(consumers) if consumers else len(rec.nodes)
    for module, call, pos, boundary in rec.returns.get(v, []):
        if first_use >= boundary:
            return module, call, pos
    return None
