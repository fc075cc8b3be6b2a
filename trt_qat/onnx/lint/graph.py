"""The linter's view of one ONNX graph: onnx-graphsurgeon's nodes and tensors, plus constant values, attributes,
shapes and element types, and the Q/DQ scales compared by value.

Producers, consumers, constants and attributes come from onnx-graphsurgeon (``gs.import_onnx``), imported lazily
and with its logger silenced: graphsurgeon prints its warnings (no default-domain opset, an element type NumPy
lacks such as FP8) to standard output, where they would land in ``trt-qat lint``'s table. Shapes and
element types are read from the model's own type annotations instead of graphsurgeon's ``Tensor.shape`` and
``Tensor.dtype``, because graphsurgeon's importer resolves them differently from the linter: when a tensor is
annotated both in ``graph.value_info`` and in ``graph.output`` (or ``graph.input``), graphsurgeon keeps the first
``value_info`` entry while the linter lets the graph's own input/output annotation win; graphsurgeon keeps a
dimension of 0 and turns an unknown one into None, and stores element types as NumPy dtypes. MAC counts depend on
these shapes, so the linter's rule (graph input/output over ``value_info``, initializer dims over both, shapes
from ONNX shape inference only for tensors without one, every symbolic, unknown or non-positive dimension
counted as 1) is kept as it was.

Cost, measured on ``reports/demo/artifacts/model_qat_qdq.onnx`` (814 nodes; median of 15 runs on 2 busy CPU
cores): building this view takes 25-30 ms with graphsurgeon (its import creates a Python object per tensor and
node) against 2.5 ms for the former hand-written producer/consumer maps, and a whole
:func:`~trt_qat.onnx.lint.core.lint_onnx` about 80 ms against 38 ms; the walks cost the same. The ``trt-qat
lint`` command takes 2.5-7 s there (interpreter start-up and imports), so the difference is below its
run-to-run noise, and graphsurgeon is used.
"""
from __future__ import annotations

import numpy as np

__all__ = ["LintGraph", "ScaleKey", "distinct_scales", "SCALE_RTOL"]

#: relative tolerance under which two Q/DQ scales count as equal
SCALE_RTOL = 1e-6
_CONSTANT_NODE_SCALARS = ("value_float", "value_floats", "value_int", "value_ints")


class LintGraph:
    """Producer/consumer links, constant values, attributes and shapes of one ONNX graph's top level.

    Nodes and tensors are onnx-graphsurgeon objects; a tensor with an empty name stands for an omitted optional
    input or output and has no producer, consumers or value. Nodes of subgraphs (If / Loop bodies) are not part
    of the view: they are neither producers nor consumers of the top-level tensors.

    Args:
        model (onnx.ModelProto): the model (not modified).
    """

    def __init__(self, model):
        graph = _import_graph(model)
        self.model = model
        self.nodes = list(graph.nodes)
        self._names = {id(node): node.name or f"{node.op}#{i}" for i, node in enumerate(self.nodes)}
        self.graph_inputs = {t.name for t in graph.inputs}  # graphsurgeon leaves initializers out
        self.graph_outputs = {t.name for t in graph.outputs}
        self._initializers = {init.name for init in model.graph.initializer}
        self.shapes = {}
        self.elem_types = {}
        g = model.graph
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            self._record_value_info(vi)
        for init in g.initializer:
            self.shapes[init.name] = list(init.dims)
            self.elem_types[init.name] = init.data_type
        self._const_cache = {}

    def _record_value_info(self, vi):
        if not vi.type.HasField("tensor_type"):
            return
        t = vi.type.tensor_type
        self.elem_types[vi.name] = t.elem_type
        if t.HasField("shape"):
            # Symbolic or unknown dims (dynamic batch) count as 1.
            self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                                    for d in t.shape.dim]

    def add_shapes(self, inferred_model):
        """Take shapes and element types from ``inferred_model`` (the output of ONNX shape inference) for the
        tensors that have no shape yet."""
        g = inferred_model.graph
        for vi in list(g.value_info) + list(g.output):
            if vi.name not in self.shapes:
                self._record_value_info(vi)

    def name(self, node) -> str:
        """The node's name, or ``"<op>#<index>"`` when the ONNX node has none."""
        return self._names[id(node)]

    def producer(self, tensor):
        """The top-level node that writes ``tensor`` (a gs Tensor), or None for graph inputs and constants."""
        if not tensor.name:
            return None
        for node in reversed(tensor.inputs):
            if id(node) in self._names:
                return node
        return None

    def consumers(self, tensor) -> list:
        """The top-level nodes that read ``tensor``, in graph order; a node reading it twice is listed twice."""
        if not tensor.name:
            return []
        return [node for node in tensor.outputs if id(node) in self._names]

    def consumed_tensors(self):
        """Every named tensor that some top-level node reads, in order of first use."""
        seen = set()
        for node in self.nodes:
            for tensor in node.inputs:
                if tensor.name and tensor.name not in seen:
                    seen.add(tensor.name)
                    yield tensor

    def shape(self, tensor):
        """The shape (list of int, unknown dims as 1) of ``tensor``, or None when unknown."""
        return self.shapes.get(tensor.name)

    def elem_type(self, tensor):
        """The ONNX element type (``TensorProto.DataType`` value) of ``tensor``, or None when unknown."""
        return self.elem_types.get(tensor.name)

    def const(self, tensor):
        """The value of ``tensor`` when it is an initializer or a Constant node's output (through Identity)."""
        if tensor is None or not tensor.name:
            return None
        if tensor.name in self._const_cache:
            return self._const_cache[tensor.name]
        value = None
        if tensor.name in self._initializers:
            value = _values(tensor)
        else:
            node = self.producer(tensor)
            if node is not None and node.op == "Constant":
                value = _constant_node_value(node)
            elif node is not None and node.op == "Identity":
                value = self.const(node.inputs[0])
        self._const_cache[tensor.name] = value
        return value

    def is_const(self, tensor) -> bool:
        return self.const(tensor) is not None

    @staticmethod
    def attr(node, name, default=None):
        """The node's attribute ``name`` (strings as str), or ``default`` when it is not set."""
        return node.attrs.get(name, default)


def _import_graph(model):
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    with G_LOGGER.suppress():
        return gs.import_onnx(model)


def _values(constant):
    from onnx_graphsurgeon.logger import G_LOGGER

    with G_LOGGER.suppress():  # loading an FP8 / BF16 constant warns on stdout
        return constant.values


def _constant_node_value(node):
    for key, value in node.attrs.items():
        if key == "value":
            return _values(value)
        if key in _CONSTANT_NODE_SCALARS:
            return np.asarray(value)
    return None


class ScaleKey:
    """A Q/DQ node's scale compared by value (rtol :data:`SCALE_RTOL`), or by tensor name when it is not a
    constant.

    Args:
        graph (LintGraph): the graph.
        node (onnx_graphsurgeon.Node): a QuantizeLinear or DequantizeLinear node.
    """

    def __init__(self, graph: LintGraph, node):
        self.node = node
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        self.tensor = scale.name if scale is not None else ""
        value = graph.const(scale)
        self.value = None if value is None else np.asarray(value, dtype=np.float64).reshape(-1)

    def same(self, other: "ScaleKey") -> bool:
        if self.value is None or other.value is None:
            return self.tensor == other.tensor
        if self.value.shape != other.value.shape:
            return False
        return bool(np.allclose(self.value, other.value, rtol=SCALE_RTOL, atol=0.0))

    def known(self) -> bool:
        return self.value is not None

    def text(self) -> str:
        if self.value is None:
            return f"<{self.tensor}>"
        if self.value.size == 1:
            return f"{self.value[0]:.6g}"
        return f"[{self.value.size} channels]"


def distinct_scales(keys) -> list:
    """Group scale keys by value; returns one representative per distinct value (unknown values ignored)."""
    reps = []
    for key in keys:
        if not key.known():
            continue
        if not any(key.same(r) for r in reps):
            reps.append(key)
    return reps
