"""trt_qat.onnx.lint.walks: how DQ and Q move through data-movement and commuting ops."""
from __future__ import annotations

import numpy as np
from fixtures_lint import GraphBuilder

from trt_qat.onnx.lint.walks import QdqGraph


def _graph(b):
    g = QdqGraph(b.model())
    by_name = {n.name: n for n in g.nodes}
    return g, by_name


def test_dq_producer_and_q_consumers_through_data_movement():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 2, 2])
    y = b.dq(b.q(x, 0.1), 0.1, name="dq")
    y = b.node("Transpose", [b.node("Reshape", [y, b.const(np.array([1, 4, 4], np.int64))], name="rs")],
               name="tr", perm=[0, 2, 1])
    side = b.node("Sigmoid", [y], name="sig")
    b.output(b.dq(b.q(b.node("Flatten", [y], name="fl"), 0.2, name="q2"), 0.2))
    b.output(side)
    b.output(y)
    g, n = _graph(b)
    t = n["tr"].outputs[0]
    assert g.dq_producer(t) is n["dq"]
    assert g.dq_producer(n["sig"].outputs[0]) is None  # Sigmoid is not data movement
    qs, others = g.q_consumers(t)
    assert qs == [n["q2"]]  # through Flatten
    assert others == [n["sig"], None]  # None: the tensor is also a graph output
    assert [k.node for k in g.tensor_scales(t)] == [n["dq"], n["q2"]]


def test_act_quantized_through_commuting_ops_and_concat():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 4, 4])
    a = b.qdq(x, 0.1)
    pooled = b.node("MaxPool", [a], name="pool", kernel_shape=[2, 2])
    up_lin = b.node("Resize", [pooled, "", b.const(np.array([1, 1, 2, 2], np.float32))], name="lin", mode="linear")
    up_near = b.node("Resize", [pooled, "", b.const(np.array([1, 1, 2, 2], np.float32))], name="near",
                     mode="nearest")
    cat_ok = b.node("Concat", [up_near, b.qdq(x, 0.1)], name="cat_ok", axis=1)
    cat_bad = b.node("Concat", [up_near, x], name="cat_bad", axis=1)
    for t in (up_lin, cat_ok, cat_bad):
        b.output(t)
    g, n = _graph(b)
    assert g.act_quantized(n["pool"].outputs[0])
    assert g.act_quantized(n["near"].outputs[0]) and g.nearest(n["near"]) and g.commutes(n["near"])
    assert not g.act_quantized(n["lin"].outputs[0]) and not g.commutes(n["lin"])
    assert g.act_quantized(n["cat_ok"].outputs[0])
    assert not g.act_quantized(n["cat_bad"].outputs[0])  # every Concat input must be quantized


def test_weights_and_weighted_producers():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 4, 4])
    w_q = b.node("Cast", [b.weight((4, 4, 1, 1))], name="cast", to=1)  # const -> Q -> DQ -> Cast
    w_float = b.const(np.ones((4, 4, 1, 1), np.float32))
    conv = b.node("Conv", [b.qdq(x, 0.1), w_q], name="conv")
    act = b.node("Relu", [b.node("Mul", [conv, b.const(np.float32(2.0))], name="mul")], name="relu")
    b.output(act)
    b.output(b.node("Conv", [x, w_float], name="conv_f"))
    g, n = _graph(b)
    w = n["conv"].inputs[1]
    assert g.weight_is_const(w) and g.weight_quantized(w)
    assert g.weight_is_const(n["conv_f"].inputs[1]) and not g.weight_quantized(n["conv_f"].inputs[1])
    assert not g.weight_is_const(n["conv"].inputs[0])  # an activation
    assert g.from_weighted(n["relu"].outputs[0])  # Conv -> Mul -> Relu: fusable epilogue
    assert not g.from_weighted(n["conv"].inputs[0])
