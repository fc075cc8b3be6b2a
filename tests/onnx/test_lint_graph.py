"""trt_qat.onnx.lint.graph: the onnx-graphsurgeon graph view (names, producers, consumers, constants, shapes) and
scale keys."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures_lint import GraphBuilder
from onnx import TensorProto, helper, numpy_helper

from trt_qat.onnx.lint import lint_onnx
from trt_qat.onnx.lint.graph import LintGraph, ScaleKey, distinct_scales


def _model(nodes, inputs, outputs, inits=(), value_info=(), opsets=(("", 13),)):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_names_producers_and_consumers():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),  # unnamed
             helper.make_node("Mul", ["r", "r"], ["m"], name="mul"),  # reads r twice
             helper.make_node("Resize", ["m", "", "sc"], ["y"], name="up")]  # an omitted optional input
    g = LintGraph(_model(nodes, [_vi("x", [1, 4, 2, 2])], [_vi("y", None)],
                         [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]))
    relu, mul, up = g.nodes
    assert [g.name(n) for n in g.nodes] == ["Relu#0", "mul", "up"]
    r = relu.outputs[0]
    assert g.producer(r) is relu and g.consumers(r) == [mul, mul]
    assert g.producer(relu.inputs[0]) is None and g.producer(up.inputs[2]) is None  # graph input, initializer
    empty = up.inputs[1]
    assert empty.name == "" and g.producer(empty) is None and g.consumers(empty) == [] and g.const(empty) is None
    assert [t.name for t in g.consumed_tensors()] == ["x", "r", "m", "sc"]
    assert g.graph_inputs == {"x"} and g.graph_outputs == {"y"}
    assert g.attr(up, "mode", "nearest") == "nearest" and g.attr(up, "missing") is None


def test_subgraph_nodes_are_not_top_level_consumers():
    """A Q read only inside an If branch is dead at the top level, as the linter always reported it."""
    then_g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["t"], name="dq_then")],
                               "then", [], [_vi("t", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id_else")], "else", [],
                               [_vi("e", [1, 4])])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    model = _model(nodes, [_vi("x", [1, 4]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", None)],
                   [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                    numpy_helper.from_array(np.array(0, np.int8), "z")])
    g = LintGraph(model)
    assert [g.name(n) for n in g.nodes] == ["q", "if"]
    assert g.consumers(g.nodes[0].outputs[0]) == []
    assert [f.code for f in lint_onnx(model).findings if f.node == "q"] == ["dead-q"]


def test_shapes_follow_the_graph_annotations_not_value_info():
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="r1"), helper.make_node("Relu", ["h"], ["y"], name="r2")]
    model = _model(nodes, [_vi("x", [0, "N", None, 4])], [_vi("y", [1, 8])],
                   [numpy_helper.from_array(np.zeros((3, 2), np.int8), "w")],
                   value_info=[_vi("y", [1, 4]), _vi("h", [2, 2])])
    g = LintGraph(model)
    assert g.shapes["y"] == [1, 8]  # the graph output's own annotation wins over value_info
    assert g.shapes["x"] == [1, 1, 1, 4]  # dims 0, symbolic and unknown count as 1
    assert g.shapes["w"] == [3, 2] and g.elem_types["w"] == TensorProto.INT8
    assert g.shape(g.nodes[0].outputs[0]) == [2, 2] and g.elem_type(g.nodes[0].outputs[0]) == TensorProto.FLOAT
    inferred = _model(nodes, [_vi("x", [1, 4])], [_vi("y", [9, 9])], value_info=[_vi("h", [7, 7]), _vi("z", [5])])
    g.add_shapes(inferred)
    assert g.shapes["h"] == [2, 2] and g.shapes["y"] == [1, 8] and g.shapes["z"] == [5]  # fills only the unknown


def test_constant_values():
    b = GraphBuilder()
    x = b.input("x", [1, 4])
    init = b.const(np.float32(0.5), name="init")
    b.nodes.append(helper.make_node("Constant", [], ["cv"], value=helper.make_tensor("v", TensorProto.FLOAT, [2],
                                                                                     [1.0, 2.0])))
    b.nodes.append(helper.make_node("Constant", [], ["cf"], value_float=0.25))
    b.nodes.append(helper.make_node("Constant", [], ["ci"], value_ints=[1, 2, 3]))
    ident = b.node("Identity", [b.node("Identity", [init])])
    b.output(b.node("Add", [x, ident], name="add"))
    g = LintGraph(b.model())
    tensors = {t.name: t for n in g.nodes for t in list(n.inputs) + list(n.outputs)}
    assert g.const(tensors["init"]) == pytest.approx(0.5)
    np.testing.assert_array_equal(g.const(tensors["cv"]), [1.0, 2.0])
    assert g.const(tensors["cf"]) == pytest.approx(0.25)
    np.testing.assert_array_equal(g.const(tensors["ci"]), [1, 2, 3])
    assert g.const(tensors[ident]) == pytest.approx(0.5)  # through two Identity nodes
    assert g.const(tensors[ident]) is g.const(tensors[ident])  # cached
    assert not g.is_const(tensors["x"]) and g.const(None) is None


def test_graphsurgeon_warnings_stay_out_of_the_output(capsys):
    """onnx-graphsurgeon prints warnings (FP8 types, no default-domain opset) to stdout; lint output must not
    carry them."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])]
    report = lint_onnx(_model(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 4])], inits, opsets=(("", 19),)))
    assert [f.code for f in report.findings if f.node == "q"] == ["zero-point-dtype"]
    assert "FLOAT8E4M3FN" in report.findings[0].message
    report = lint_onnx(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [1, 4])], [_vi("y", [1, 4])],
                              opsets=(("custom", 1),)))
    assert report.stats["opset"] is None and [f.code for f in report.findings] == ["no-qdq"]
    assert capsys.readouterr().out == ""


def test_scale_keys_compare_by_value():
    b = GraphBuilder()
    x = b.input("x", [1, 4])
    y = b.dq(b.q(x, 0.1, name="qa"), 0.1 * (1 + 1e-8), name="dqa")
    y = b.dq(b.q(y, 0.2, name="qb"), np.full(4, 0.2, np.float32), axis=1, name="dqb")
    nodes = [helper.make_node("QuantizeLinear", [y, "s_rt", "z_rt"], ["q_rt"], name="q_rt")]
    b.nodes += nodes
    b.output("q_rt")
    g = LintGraph(b.model())
    keys = {n.name: ScaleKey(g, n) for n in g.nodes}
    assert keys["qa"].same(keys["dqa"]) and not keys["qa"].same(keys["qb"])
    assert not keys["qb"].same(keys["dqb"])  # a scalar and a 4-channel scale differ by shape
    assert keys["qa"].text() == "0.1" and keys["dqb"].text() == "[4 channels]"
    assert not keys["q_rt"].known() and keys["q_rt"].text() == "<s_rt>"
    reps = distinct_scales(keys.values())
    assert [k.node.name for k in reps] == ["qa", "qb", "dqb"]  # one per value, the unknown one left out
