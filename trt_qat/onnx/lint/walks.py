"""How quantization moves through a graph: the upstream and downstream walks the checks share.

TensorRT's explicit-quantization builder moves a DequantizeLinear forward and a QuantizeLinear backward through
ops that only move data, so "is this input INT8?" and "which scales does this tensor carry?" are walks over
:class:`~trt_qat.onnx.lint.graph.LintGraph` through those ops.
"""
from __future__ import annotations

from trt_qat.onnx.lint.graph import LintGraph, ScaleKey

__all__ = ["QdqGraph", "WEIGHTED_OPS", "PASS_THROUGH_OPS", "SCALE_SHARING_OPS", "EPILOGUE_OPS"]

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that only move or reshape data: a DQ commutes through them and they need no scale of their own.
PASS_THROUGH_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                    "Pad", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"}
# Ops that commute with quantization but that TensorRT runs in INT8 only when both sides share one scale.
SCALE_SHARING_OPS = {"MaxPool", "GlobalMaxPool", "Resize", "Upsample"}
# Pointwise ops TensorRT fuses into a weighted op's epilogue (used to find the conv branch of a residual Add).
EPILOGUE_OPS = {"Relu", "LeakyRelu", "Sigmoid", "Mul", "Clip", "HardSwish", "HardSigmoid", "BatchNormalization",
                "Tanh", "PRelu", "Elu", "Selu", "Softplus", "Mish", "Gelu"}


class QdqGraph(LintGraph):
    """A :class:`LintGraph` with the Q/DQ walks; tensors and nodes are onnx-graphsurgeon objects.

    Args:
        model (onnx.ModelProto): the model (not modified).
    """

    def __init__(self, model):
        super().__init__(model)
        self._act_memo = {}

    def nearest(self, node) -> bool:
        """False for a Resize / Upsample that interpolates (not nearest), which does not commute with Q/DQ."""
        if node.op in ("Resize", "Upsample"):
            mode = self.attr(node, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            return mode == "nearest"
        return True

    def commutes(self, node) -> bool:
        """True when a DQ moves forward through ``node`` (a data-movement op, or a nearest scale-sharing op)."""
        if node.op in PASS_THROUGH_OPS:
            return True
        if node.op in SCALE_SHARING_OPS:
            return self.nearest(node)
        return False

    def dq_producer(self, tensor, through=PASS_THROUGH_OPS):
        """The DQ node producing ``tensor``, looking upstream through data-movement ops; else None."""
        seen = 0
        while tensor.name and seen < 32:
            node = self.producer(tensor)
            if node is None:
                return None
            if node.op == "DequantizeLinear":
                return node
            if node.op in through:
                tensor = node.inputs[0]
                seen += 1
                continue
            return None
        return None

    def q_consumers(self, tensor, through=PASS_THROUGH_OPS, depth=0):
        """Q nodes consuming ``tensor`` (downstream through data-movement ops) and the other consumers (None
        standing for the graph output)."""
        qs, others = [], []
        if depth > 32:
            return qs, others
        for node in self.consumers(tensor):
            if node.op == "QuantizeLinear" and node.inputs[0].name == tensor.name:
                qs.append(node)
            elif node.op in through and node.inputs[0].name == tensor.name:
                for out in node.outputs:
                    sub_q, sub_o = self.q_consumers(out, through, depth + 1)
                    qs += sub_q
                    others += sub_o
                if not any(out.name for out in node.outputs):
                    others.append(node)
            else:
                others.append(node)
        if tensor.name in self.graph_outputs:
            others.append(None)
        return qs, others

    def tensor_scales(self, tensor) -> list:
        """Every scale attached to ``tensor``: its DQ producer and the Q nodes that quantize it."""
        keys = []
        dq = self.dq_producer(tensor)
        if dq is not None:
            keys.append(ScaleKey(self, dq))
        qs, _ = self.q_consumers(tensor)
        keys += [ScaleKey(self, q) for q in qs]
        return keys

    def act_quantized(self, tensor, depth=0) -> bool:
        """True when ``tensor`` reaches its consumer in INT8: a DQ, possibly moved forward through commuting
        ops (all inputs of a Concat must be quantized)."""
        if tensor.name in self._act_memo:
            return self._act_memo[tensor.name]
        result = False
        node = self.producer(tensor)
        if node is not None and depth < 64:
            if node.op == "DequantizeLinear":
                result = True
            elif self.commutes(node) and node.inputs:
                result = self.act_quantized(node.inputs[0], depth + 1)
            elif node.op == "Concat":
                result = all(self.act_quantized(t, depth + 1) for t in node.inputs if t.name)
        self._act_memo[tensor.name] = result
        return result

    def from_weighted(self, tensor) -> bool:
        """True when ``tensor`` is a weighted op's output, possibly through fusable pointwise ops."""
        for _ in range(4):
            node = self.producer(tensor)
            if node is None:
                return False
            if node.op in WEIGHTED_OPS:
                return True
            if node.op not in EPILOGUE_OPS or not node.inputs:
                return False
            tensor = node.inputs[0]
        return False

    def weight_is_const(self, tensor) -> bool:
        """True when ``tensor`` derives only from constants (a weight), through DQ/Q/Transpose/Reshape/..."""
        for _ in range(16):
            if self.is_const(tensor):
                return True
            node = self.producer(tensor)
            if node is None:
                return False
            if node.op in ("DequantizeLinear", "QuantizeLinear", "Cast") or node.op in PASS_THROUGH_OPS:
                tensor = node.inputs[0]
                continue
            return False
        return False

    def weight_quantized(self, tensor) -> bool:
        """True when a weight arrives through a DQ (possibly through data-movement ops and Casts)."""
        return self.dq_producer(tensor, PASS_THROUGH_OPS | {"Cast"}) is not None
