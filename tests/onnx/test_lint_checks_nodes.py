"""trt_qat.onnx.lint.checks_nodes: opset, dangling/dead Q and DQ, zero-points, scale shapes, Constant-node
scales."""
from __future__ import annotations

import numpy as np
from fixtures_lint import GraphBuilder, codes
from onnx import TensorProto, helper

from trt_qat.onnx.lint import lint_onnx


def test_dangling_q_and_dq():
    b = GraphBuilder()
    x = b.input("x", [1, 4])
    b.output(b.node("Relu", [b.q(x, 0.1, name="q_bad")]))
    b.output(b.dq(b.node("Relu", [x]), 0.1, name="dq_bad"))
    b.q(x, 0.1, name="q_dead")
    report = lint_onnx(b.model())
    assert codes(report, "q_bad") == ["dangling-q"]
    assert codes(report, "dq_bad") == ["dangling-dq"]
    assert codes(report, "q_dead") == ["dead-q"]
    assert all(f.severity == "error" for f in report.findings if f.code.startswith("dangling"))


def test_zero_point_checks_and_per_tensor_weight():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.dq(b.q(x, 0.1, zp=3, name="q_zp"), 0.1, zp=3)
    w = b.weight((4, 3, 1, 1), per_channel=False)
    y = b.node("Conv", [y, w], name="c", kernel_shape=[1, 1])
    y = b.dq(b.q(y, 0.1, name="q_u8", zp_dtype=np.uint8), 0.1, zp_dtype=np.uint8)
    b.output(y)
    report = lint_onnx(b.model())
    assert codes(report, "q_zp") == ["nonzero-zero-point"]
    assert report.by_code("nonzero-zero-point")[0].severity == "error"
    assert codes(report, "q_u8") == ["zero-point-uint8"]
    assert "per-tensor-weight" in codes(report, "c")


def test_low_opset_is_an_error():
    b = GraphBuilder(opset=12)
    x = b.input("x", [1, 3, 8, 8])
    b.output(b.conv(x, 3, 4, name="c"))
    report = lint_onnx(b.model())
    assert "opset-too-low" in codes(report)
    assert report.stats["opset"] == 12


def test_constant_node_scales_and_float_model():
    b = GraphBuilder()
    x = b.input("x", [1, 4])
    b.output(b.node("Relu", [x]))
    report = lint_onnx(b.model())
    assert codes(report) == ["no-qdq"]
    # Scales given by Constant nodes (as the TorchScript exporter writes them) are read by value.
    nodes = [helper.make_node("Constant", [], [f"s{i}"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [0.1]))
             for i in range(2)]
    nodes += [helper.make_node("Constant", [], ["z"], value=helper.make_tensor("v", TensorProto.INT8, [], [0])),
              helper.make_node("QuantizeLinear", ["x", "s0", "z"], ["q"], name="q"),
              helper.make_node("DequantizeLinear", ["q", "s1", "z"], ["dq"], name="dq"),
              helper.make_node("QuantizeLinear", ["dq", "s1", "z"], ["q2"], name="q2"),
              helper.make_node("DequantizeLinear", ["q2", "s0", "z"], ["y"], name="dq2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    report = lint_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert codes(report, "dq") == ["redundant-dq-q"]  # equal values: no requantize
    assert report.stats["requantize_chains"] == 0 and report.errors == []


def test_one_element_1d_per_tensor_scale_is_flagged():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from trt_qat.onnx.lint import lint_onnx

    inits = [numpy_helper.from_array(np.array([0.1], np.float32), "s1d"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s0d"),
             numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1d", "zp"], ["q"], name="q_bad"),
             helper.make_node("DequantizeLinear", ["q", "s0d", "zp"], ["y"], name="dq_ok")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    found = lint_onnx(model).by_code("per-tensor-scale-shape")
    assert [f.node for f in found] == ["q_bad"]
