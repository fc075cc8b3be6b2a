"""Small Q/DQ graphs built with onnx.helper for the linter's tests (tests/onnx/test_lint_*.py)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """A tiny helper that builds Q/DQ graphs with unique names."""

    def __init__(self, opset=13):
        self.nodes, self.inits, self.opset = [], [], opset
        self.inputs, self.outputs = [], []
        self.count = 0

    def uid(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, value, name=None):
        name = name or self.uid("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def input(self, name, shape):
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def output(self, name):
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def node(self, op, inputs, name=None, n_out=1, **attrs):
        name = name or self.uid(op)
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def q(self, x, scale, zp=0, axis=None, name=None, zp_dtype=np.int8):
        attrs = {} if axis is None else {"axis": axis}
        s = self.const(np.asarray(scale, dtype=np.float32))
        z = self.const(np.full(np.shape(scale), zp, dtype=zp_dtype))
        return self.node("QuantizeLinear", [x, s, z], name=name, **attrs)

    def dq(self, x, scale, zp=0, axis=None, name=None, zp_dtype=np.int8):
        attrs = {} if axis is None else {"axis": axis}
        s = self.const(np.asarray(scale, dtype=np.float32))
        z = self.const(np.full(np.shape(scale), zp, dtype=zp_dtype))
        return self.node("DequantizeLinear", [x, s, z], name=name, **attrs)

    def qdq(self, x, scale, name=None, **kw):
        return self.dq(self.q(x, scale, name=name and name + "_q", **kw), scale, name=name and name + "_dq", **kw)

    def weight(self, shape, axis=0, quantize=True, per_channel=True):
        w = self.const(np.random.default_rng(0).normal(size=shape).astype(np.float32))
        if not quantize:
            return w
        scale = np.full(shape[axis], 0.01, np.float32) if per_channel else np.float32(0.01)
        return self.qdq(w, scale, axis=axis if per_channel else None)

    def conv(self, x, cin, cout, k=3, name=None, quant_act=True, quant_w=True, act_scale=0.05, **attrs):
        if quant_act:
            x = self.qdq(x, act_scale)
        w = self.weight((cout, cin, k, k), quantize=quant_w)
        pads = [k // 2] * 4
        return self.node("Conv", [x, w], name=name, kernel_shape=[k, k], pads=pads, **attrs)

    def model(self):
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])


def codes(report, node=None):
    return [f.code for f in report.findings if node is None or f.node == node]


def two_conv_graph(batch="N"):
    """conv1 (3->8, 3x3, INT8) then conv2 (8->4, 1x1, float) on a 1x3x16x16 input with a symbolic batch."""
    b = GraphBuilder()
    x = b.input("x", [batch, 3, 16, 16])
    y = b.conv(x, 3, 8, k=3, name="conv1")
    y = b.conv(y, 8, 4, k=1, name="conv2", quant_act=False, quant_w=False)
    b.output(y)
    return b.model()


def concat_graph(scales):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    ins = [b.qdq(b.node("Relu", [x]), s) for s in scales[:-1]]
    cat = b.node("Concat", ins, name="cat", axis=1)
    b.output(b.conv(cat, 4 * len(ins), 4, name="head", act_scale=scales[-1]))
    return b.model()


def maxpool_graph(in_scale, out_scale, op="MaxPool", **attrs):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    y = b.qdq(b.node("Relu", [x]), in_scale)
    if op == "MaxPool":
        y = b.node("MaxPool", [y], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    else:
        y = b.node("Resize", [y, "", b.const(np.array([1, 1, 2, 2], np.float32))], name="pool", **attrs)
    if out_scale is not None:
        y = b.qdq(y, out_scale)
    b.output(b.node("Conv", [y, b.weight((4, 4, 1, 1))], name="c", kernel_shape=[1, 1]))
    return b.model()


def convtranspose_graph(axis):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    w = b.weight((4, 6, 2, 2), axis=axis)  # ConvTranspose weight: [Cin, Cout/groups, kh, kw]
    b.output(b.node("ConvTranspose", [b.qdq(x, 0.1), w], name="up", kernel_shape=[2, 2], strides=[2, 2]))
    return b.model()
