"""The linter's 2:4 check (trt_qat.onnx.lint.checks_sparsity): per conv, whether its weights hold 2:4 as TensorRT
sees them (behind Q/DQ, quantized) and whether it is large enough; the fraction of conv MACs 2:4-ready."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from fixtures_lint import GraphBuilder, two_conv_graph

from trt_qat.cli.lint import main
from trt_qat.onnx.lint import lint_onnx
from trt_qat.onnx.lint.checks_sparsity import weights_hold_2_4


def _two_4(w):
    w = w.copy()
    w[:, 0::4] = 0
    w[:, 3::4] = 0
    return w


def _graph(big=32, small=8, sparse_big=True, sparse_small=True, tiny=0.0):
    """x -> conv ``big`` (big -> big, 3x3, Q/DQ weights) -> conv ``small`` (big -> small, 1x1, float weights)."""
    rng = np.random.default_rng(0)
    b = GraphBuilder()
    x = b.input("x", [1, big, 8, 8])
    w1 = rng.normal(size=(big, big, 3, 3)).astype(np.float32)
    if sparse_big:
        w1 = _two_4(w1)
        w1[:, 0::4] = tiny  # below half a quantization step: quantizes to 0
    w1_dq = b.qdq(b.const(w1), np.full(big, 0.01, np.float32), axis=0)
    y = b.node("Conv", [b.qdq(x, 0.05), w1_dq], name="big", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    w2 = rng.normal(size=(small, big, 1, 1)).astype(np.float32)
    w2 = _two_4(w2) if sparse_small else w2
    b.output(b.node("Conv", [y, b.const(w2)], name="small", kernel_shape=[1, 1]))
    return b.model()


def test_weights_hold_2_4():
    w = np.ones((2, 8, 1, 1))
    assert not weights_hold_2_4(w) and weights_hold_2_4(_two_4(w))
    assert not weights_hold_2_4(np.zeros((2, 3, 1, 1)))  # input channels not a multiple of 4


def test_per_conv_state_and_ready_fraction():
    report = lint_onnx(_graph(tiny=0.004), sparsity_min_channels=32)
    sp = report.stats["sparsity"]
    layers = {la["node"]: la for la in sp["layers"]}
    assert layers["big"]["holds_2_4"] and layers["big"]["large_enough"]  # 0.004 / 0.01 rounds to 0
    assert layers["small"]["holds_2_4"] and not layers["small"]["large_enough"]
    assert sp["ready"] == 1 and sp["holding_2_4"] == 2 and sp["convs"] == 2
    big_macs, small_macs = 32 * 32 * 9 * 64, 8 * 32 * 64
    assert sp["ready_fraction"] == pytest.approx(big_macs / (big_macs + small_macs))
    assert sp["ready_fraction_of_eligible"] == pytest.approx(1.0)
    assert [f.node for f in report.by_code("sparse-too-small")] == ["small"]
    assert "2:4-ready 1/2 convs" in report.summary()
    table = report.format_table()
    assert "big: 32->32 ch, 2:4, large enough" in table and "small: 32->8 ch, 2:4, too small" in table


def test_float_weights_that_do_not_quantize_to_zero_break_the_pattern():
    sp = lint_onnx(_graph(tiny=0.02), sparsity_min_channels=32).stats["sparsity"]
    assert {la["node"]: la["holds_2_4"] for la in sp["layers"]}["big"] is False
    assert sp["ready_fraction"] == 0.0


def test_dense_model_keeps_its_summary_line():
    report = lint_onnx(two_conv_graph())
    assert report.stats["sparsity"]["holding_2_4"] == 0
    assert "2:4" not in report.summary() and "2:4 sparsity" not in report.format_table()
    assert "2:4 sparsity" in report.format_table(show_sparsity=True)


def test_cli_sparsity_flags(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(sparse_small=False), str(path))
    out = tmp_path / "r.json"
    assert main([str(path), "--sparsity", "--min-channels", "16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2:4 sparsity (ready: holds 2:4 and >= 16" in printed and "small: 32->8 ch, dense, too small" in printed
    assert json.loads(out.read_text())["stats"]["sparsity"]["min_channels"] == 16
