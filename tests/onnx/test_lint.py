"""Tests for trt_qat.lint: small Q/DQ graphs built with onnx.helper, plus one real pytorch-quantization export."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trt_qat.cli.lint import main
from trt_qat.errors import TrtQatError
from trt_qat.onnx.lint.linter import Finding, lint_onnx


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


def test_eligible_conv_and_coverage_exact():
    report = lint_onnx(two_conv_graph())
    assert "int8-eligible" in codes(report, "conv1")
    assert codes(report, "conv2") == ["not-int8"]
    (f,) = report.by_code("not-int8")
    assert "activation not quantized" in f.message and "weight not quantized" in f.message
    assert f.fix
    conv1 = 16 * 16 * 8 * 3 * 3 * 3  # out_h*out_w*Cout*Cin*kh*kw, batch 1
    conv2 = 16 * 16 * 4 * 8
    s = report.stats
    assert s["total_macs"] == conv1 + conv2 and s["int8_macs"] == conv1
    assert s["int8_coverage"] == pytest.approx(conv1 / (conv1 + conv2))
    assert [layer["node"] for layer in s["float_layers"]] == ["conv2"]
    assert report.errors == []
    assert f"{100 * conv1 / (conv1 + conv2):.1f}% of MACs INT8" in report.summary()


def test_skip_nodes_excluded_from_coverage():
    report = lint_onnx(two_conv_graph(), skip_nodes=["^conv2$"])
    assert codes(report, "conv2") == ["float-by-choice"]
    assert report.stats["int8_coverage_excluding_skipped"] == pytest.approx(1.0)
    assert report.stats["int8_coverage"] < 1.0
    assert report.stats["float_layers"][0]["skipped"] is True
    assert "excluding 1 skipped" in report.summary()


def test_weight_not_quantized_only():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    b.output(b.conv(x, 3, 4, name="c", quant_w=False))
    (f,) = lint_onnx(b.model()).by_code("not-int8")
    assert f.node == "c" and "weight not quantized" in f.message and "activation" not in f.message


def test_weight_through_transpose_counts_as_quantized_gemm():
    b = GraphBuilder()
    x = b.input("x", [2, 16])
    w = b.const(np.ones((16, 8), np.int8))  # ModelOpt style: int8 initializer -> DQ
    w = b.dq(w, np.full(8, 0.1, np.float32), axis=1)
    w = b.node("Transpose", [w], perm=[1, 0])
    y = b.node("Gemm", [b.qdq(x, 0.1), w], name="fc", transB=1)
    b.output(y)
    report = lint_onnx(b.model())
    assert "int8-eligible" in codes(report, "fc")
    assert report.stats["int8_macs"] == 2 * 8 * 16
    assert report.errors == []


def concat_graph(scales):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    ins = [b.qdq(b.node("Relu", [x]), s) for s in scales[:-1]]
    cat = b.node("Concat", ins, name="cat", axis=1)
    b.output(b.conv(cat, 4 * len(ins), 4, name="head", act_scale=scales[-1]))
    return b.model()


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


def convtranspose_graph(axis):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    w = b.weight((4, 6, 2, 2), axis=axis)  # ConvTranspose weight: [Cin, Cout/groups, kh, kw]
    b.output(b.node("ConvTranspose", [b.qdq(x, 0.1), w], name="up", kernel_shape=[2, 2], strides=[2, 2]))
    return b.model()


def test_wrong_axis_on_convtranspose():
    bad = lint_onnx(convtranspose_graph(0))
    assert "wrong-weight-axis" in codes(bad, "up")
    assert bad.by_code("wrong-weight-axis")[0].severity == "error"
    good = lint_onnx(convtranspose_graph(1))
    assert "wrong-weight-axis" not in codes(good)
    assert good.stats["int8_macs"] == 8 * 8 * 4 * 6 * 2 * 2  # in_h*in_w*Cin*Cout*kh*kw


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


def test_finding_validates_severity():
    with pytest.raises(ValueError):
        Finding("fatal", "x", "n", "m")


def test_cli_json_strict_and_table(tmp_path, capsys):
    good = tmp_path / "good.onnx"
    onnx.save(two_conv_graph(), str(good))
    out = tmp_path / "sub" / "report.json"
    assert main([str(good), "--json", str(out), "--skip", "conv2"]) == 0
    printed = capsys.readouterr().out
    assert "conv2" in printed and "float-by-choice" in printed and "coverage" in printed.splitlines()[-1]
    data = json.loads(out.read_text())
    assert data["stats"]["int8_coverage_excluding_skipped"] == pytest.approx(1.0)
    assert {"severity", "code", "node", "message", "fix", "op", "reformat"} <= set(data["findings"][0])
    assert not list(out.parent.glob("*.tmp"))

    b = GraphBuilder(opset=12)
    b.output(b.conv(b.input("x", [1, 3, 8, 8]), 3, 4, name="c"))
    bad = tmp_path / "bad.onnx"
    onnx.save(b.model(), str(bad))
    assert main([str(bad)]) == 0  # errors alone do not fail without --strict
    with pytest.raises(SystemExit) as exc:
        main([str(bad), "--strict"])
    assert exc.value.code == 1
    assert main([str(good), "--strict"]) == 0


@pytest.mark.parametrize("content", [b"\x08\x07garbage\xff\xfe not onnx at all", b""])
def test_corrupt_or_missing_input(tmp_path, capsys, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(TrtQatError):
        lint_onnx(path)
    with pytest.raises(SystemExit) as exc:
        main([str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trt_qat: error:")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing.onnx")])
    assert exc.value.code == 2


def test_large_graph_is_linted():
    b = GraphBuilder()
    y = b.input("x", [1, 8, 16, 16])
    for i in range(50):  # 300 nodes
        y = b.node("Relu", [b.conv(y, 8, 8, k=1, name=f"conv{i}", act_scale=0.1)])
    b.output(y)
    model = b.model()
    assert len(model.graph.node) >= 300
    report = lint_onnx(model)
    assert report.stats["int8_layers"] == 50 and report.stats["int8_coverage"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- a real pytorch-quantization export
@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_quantization")
    from pytorch_quantization import nn as qnn
    from pytorch_quantization.nn import TensorQuantizer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = qnn.QuantConv2d(3, 8, 3, padding=1)
            self.c2 = qnn.QuantConv2d(3, 8, 3, padding=1)
            self.c3 = qnn.QuantConv2d(16, 4, 1)
            self.side = qnn.QuantConv2d(8, 4, 1)  # quantizes c1's output with its own scale (naive placement)
            self.up = qnn.QuantConvTranspose2d(4, 6, 2, stride=2)

        def forward(self, x):
            y1 = self.c1(x)
            return self.up(self.c3(torch.cat([y1, self.c2(x)], 1))), self.side(y1)

    torch.manual_seed(0)
    model = Tiny().eval()
    amax = {"c1": 2.0, "c2": 2.0, "c3": 3.0, "side": 5.0, "up": 1.0}
    for name, mod in model.named_children():
        mod.input_quantizer.amax = torch.tensor(amax[name])
        w = mod.weight.detach()
        axis = mod.weight_quantizer.axis
        axis = axis if isinstance(axis, int) else axis[0]
        dims = [d for d in range(w.dim()) if d != axis]
        mod.weight_quantizer.amax = w.abs().amax(dim=dims, keepdim=True)
    path = tmp_path_factory.mktemp("export") / "tiny_qdq.onnx"
    old = TensorQuantizer.use_fb_fake_quant
    TensorQuantizer.use_fb_fake_quant = True
    try:
        torch.onnx.export(model, torch.randn(1, 3, 16, 16), str(path), opset_version=13, dynamo=False,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}})
    finally:
        TensorQuantizer.use_fb_fake_quant = old
    return path


@pytest.mark.filterwarnings("ignore")
def test_real_pytorch_quantization_export(real_export):
    report = lint_onnx(real_export)
    by_op = {}
    for f in report.findings:
        by_op.setdefault(f.op, []).append(f.code)
    assert report.stats["weighted_layers"] == 5 and report.stats["int8_layers"] == 5
    assert report.stats["int8_coverage"] == pytest.approx(1.0)
    expected = 16 * 16 * (8 * 3 * 9 * 2 + 4 * 16 + 4 * 8) + 16 * 16 * 4 * 6 * 4
    assert report.stats["total_macs"] == expected
    # Scales are Constant nodes: read by value. c1's output is quantized by `side` at 5/127 while the Concat's
    # consumer (c3) uses 3/127: a naive-placement mismatch.
    assert [f.node for f in report.by_code("concat-scale-mismatch")] == ["/Concat"]
    # pytorch-quantization 2.1.3 exports QuantConvTranspose2d weights along axis 0; TensorRT wants axis 1.
    assert [f.op for f in report.by_code("wrong-weight-axis")] == ["ConvTranspose"]
    assert not any(c in ("dangling-q", "dangling-dq", "nonzero-zero-point", "opset-too-low", "scale-not-constant")
                   for c in codes(report))


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


def test_one_element_1d_per_tensor_scale_is_flagged():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from trt_qat.onnx.lint.linter import lint_onnx

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
