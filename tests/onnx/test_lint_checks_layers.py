"""trt_qat.onnx.lint.checks_layers: INT8 eligibility of the weighted layers, coverage, skipped layers, weight
axis."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures_lint import GraphBuilder, codes, convtranspose_graph, two_conv_graph

from trt_qat.onnx.lint import lint_onnx


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


def test_wrong_axis_on_convtranspose():
    bad = lint_onnx(convtranspose_graph(0))
    assert "wrong-weight-axis" in codes(bad, "up")
    assert bad.by_code("wrong-weight-axis")[0].severity == "error"
    good = lint_onnx(convtranspose_graph(1))
    assert "wrong-weight-axis" not in codes(good)
    assert good.stats["int8_macs"] == 8 * 8 * 4 * 6 * 2 * 2  # in_h*in_w*Cin*Cout*kh*kw


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


def test_macs_after_a_chunk_under_a_dynamic_batch(tmp_path):
    """``torch.chunk`` exports as Slices whose bounds are computed from ``Shape`` when the batch is dynamic (every
    Ultralytics C2f); plain ONNX shape inference then loses the output's spatial size. Lint folds that shape
    arithmetic at batch 1, so the conv after the chunk is counted at its real size, not at 1x1."""
    import torch
    from torch import nn

    from trt_qat.onnx.export import export_onnx

    class Chunked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            left, right = self.a(x).chunk(2, 1)
            return torch.cat([self.b(left), right], 1)

    path = export_onnx(Chunked().eval(), torch.zeros(1, 3, 32, 32), tmp_path / "c.onnx", dynamic_batch=True)
    stats = lint_onnx(str(path)).stats
    assert stats["total_macs"] == 32 * 32 * (8 * 3 * 9 + 4 * 4 * 9) and stats["layers_with_unknown_macs"] == []
