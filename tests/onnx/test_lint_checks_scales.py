"""trt_qat.onnx.lint.checks_scales: scale mismatches at Concat, Add, MaxPool/Resize and multi-scale tensors,
requantize chains, partial quantization around commuting ops."""
from __future__ import annotations

import numpy as np
from fixtures_lint import GraphBuilder, codes, concat_graph, maxpool_graph

from trt_qat.onnx.lint import lint_onnx


def test_concat_scale_mismatch_and_match_by_value():
    bad = lint_onnx(concat_graph([0.1, 0.2, 0.1]))
    assert codes(bad, "cat") == ["concat-scale-mismatch"]
    assert bad.stats["scale_mismatches"] == 1 and bad.stats["reformat_sites"] >= 1
    # Identical values in separate initializers (different quantizer objects) are a match.
    good = lint_onnx(concat_graph([0.1, 0.1, 0.1]))
    assert codes(good, "cat") == []
    assert good.stats["scale_mismatches"] == 0
    assert "int8-eligible" in codes(good, "head")  # DQ propagates through an all-quantized Concat


def test_concat_sibling_q_mismatch():
    """The pytorch-quantization naive case: a Concat input is float but is also quantized by another layer."""
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    a = b.node("Relu", [x], name="a")
    other = b.conv(a, 4, 4, name="other", act_scale=0.3)
    cat = b.node("Concat", [a, b.node("Sigmoid", [x])], name="cat", axis=1)
    b.output(b.conv(cat, 8, 4, name="head", act_scale=0.1))
    b.output(other)
    report = lint_onnx(b.model())
    assert codes(report, "cat") == ["concat-scale-mismatch"]


def test_maxpool_scale_mismatch():
    report = lint_onnx(maxpool_graph(0.1, 0.2))
    assert codes(report, "pool") == ["commuting-scale-mismatch"]
    assert report.by_code("commuting-scale-mismatch")[0].reformat
    assert codes(lint_onnx(maxpool_graph(0.1, 0.1)), "pool") == []


def test_maxpool_without_output_q_is_still_int8():
    report = lint_onnx(maxpool_graph(0.1, None))
    assert codes(report, "pool") == []
    assert "int8-eligible" in codes(report, "c")  # DQ moves forward through MaxPool


def test_resize_nearest_mismatch_and_linear_ignored():
    assert codes(lint_onnx(maxpool_graph(0.1, 0.2, op="Resize", mode="nearest")), "pool") == \
        ["commuting-scale-mismatch"]
    assert codes(lint_onnx(maxpool_graph(0.1, 0.2, op="Resize", mode="linear")), "pool") == []


def test_commuting_partial():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    y = b.node("MaxPool", [b.node("Relu", [x])], name="pool", kernel_shape=[2, 2])
    b.output(b.node("Sigmoid", [y]))
    b.output(b.conv(b.node("Relu", [x], name="r2"), 4, 4, name="c"))
    assert codes(lint_onnx(b.model()), "pool") == []  # neither side quantized: fine
    b2 = GraphBuilder()
    x = b2.input("x", [1, 4, 8, 8])
    y = b2.node("MaxPool", [b2.qdq(b2.node("Relu", [x]), 0.1)], name="pool", kernel_shape=[2, 2])
    b2.output(b2.node("Sigmoid", [y]))
    assert codes(lint_onnx(b2.model()), "pool") == []  # DQ moves after the pool; no reformat
    b3 = GraphBuilder()
    x = b3.input("x", [1, 4, 8, 8])
    r = b3.node("Relu", [x], name="r")
    other = b3.conv(r, 4, 4, name="other", act_scale=0.1)  # r is quantized by a sibling Q
    b3.output(b3.node("Sigmoid", [b3.node("MaxPool", [r], name="pool", kernel_shape=[2, 2])]))
    b3.output(other)
    report = lint_onnx(b3.model())
    assert codes(report, "pool") == ["commuting-partial"]


def test_requantize_chain():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    y = b.dq(b.q(x, 0.1), 0.1, name="dq1")
    y = b.node("Reshape", [y, b.const(np.array([1, 4, 8, 8], np.int64))])
    y = b.qdq(y, 0.2)
    b.output(b.node("Conv", [y, b.weight((4, 4, 1, 1))], name="c", kernel_shape=[1, 1]))
    report = lint_onnx(b.model())
    assert codes(report, "dq1") == ["requantize-chain"]
    assert report.stats["requantize_chains"] == 1
    assert "int8-eligible" in codes(report, "c")


def test_add_checks():
    def add_graph(skip_scale, branch_scale, out_q):
        b = GraphBuilder()
        x = b.input("x", [1, 4, 8, 8])
        r = b.node("Relu", [x], name="r")
        branch = b.conv(r, 4, 4, name="conv", act_scale=skip_scale or 0.05)
        if branch_scale is not None:
            branch = b.qdq(branch, branch_scale)
        skip = b.qdq(r, skip_scale) if skip_scale is not None else r
        y = b.node("Add", [branch, skip], name="add")
        if out_q:
            y = b.qdq(y, 0.5)
        b.output(y)
        return b.model()

    assert codes(lint_onnx(add_graph(None, None, False)), "add") == ["add-not-fused"]
    assert codes(lint_onnx(add_graph(0.1, None, False)), "add") == []  # skip quantized: fuses
    assert codes(lint_onnx(add_graph(0.1, 0.1, True)), "add") == []  # QuantAdd with one shared scale
    report = lint_onnx(add_graph(0.1, 0.2, True))
    assert codes(report, "add") == ["add-scale-mismatch"]
    assert report.stats["scale_mismatches"] == 1


def test_commuting_output_requantized_and_read_in_float():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    y = b.node("MaxPool", [b.node("Relu", [x])], name="pool", kernel_shape=[2, 2])
    b.output(b.node("Sigmoid", [y]))
    b.output(b.conv(y, 4, 4, name="c"))
    report = lint_onnx(b.model())
    assert codes(report, "pool") == ["commuting-partial"]
    assert report.stats["reformat_sites"] == 1


def test_multi_scale_tensor():
    def graph(s1, s2):
        b = GraphBuilder()
        x = b.input("x", [1, 4, 8, 8])
        r = b.node("Relu", [x], name="r")
        b.output(b.conv(r, 4, 4, name="c1", act_scale=s1))
        b.output(b.conv(r, 4, 4, name="c2", act_scale=s2))
        return b.model()

    report = lint_onnx(graph(0.1, 0.2))
    assert codes(report, "r") == ["multi-scale-tensor"]
    assert report.stats["scale_mismatches"] == 1
    assert codes(lint_onnx(graph(0.1, 0.1)), "r") == []
