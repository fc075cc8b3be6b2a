"""trt_qat.onnx.lint.report: findings, the summary line, the JSON form and the text table."""
from __future__ import annotations

import pytest

from trt_qat.onnx.lint import Finding, LintReport


def test_finding_validates_severity():
    with pytest.raises(ValueError):
        Finding("fatal", "x", "n", "m")


def _report():
    findings = [Finding("info", "int8-eligible", "conv1", "activation and weight arrive through DequantizeLinear",
                        op="Conv"),
                Finding("warning", "concat-scale-mismatch", "cat", "2 different scales " + "x" * 60, "share one "
                        "quantizer", op="Concat"),
                Finding("error", "dangling-q", "/a/very/long/node/name/" + "n" * 60, "Q output feeds Relu",
                        "pair it", op="QuantizeLinear")]
    stats = {"int8_coverage": 0.75, "weighted_layers": 2, "int8_layers": 1, "scale_mismatches": 1,
             "reformat_sites": 1, "skipped_float_layers": 1, "int8_coverage_excluding_skipped": 1.0,
             "float_layers": [{"node": "conv2", "op": "Conv", "macs": 1234567, "reason": "weight not quantized",
                               "skipped": True}]}
    return LintReport(findings=findings, stats=stats, model="m.onnx")


def test_summary_counts_and_json():
    report = _report()
    assert [f.code for f in report.errors] == ["dangling-q"]
    assert [f.code for f in report.warnings] == ["concat-scale-mismatch"]
    assert [f.node for f in report.by_code("int8-eligible")] == ["conv1"]
    assert report.summary() == (
        "coverage 75.0% of MACs INT8 (100.0% excluding 1 skipped float layers), 1/2 weighted layers INT8, "
        "1 scale mismatches, 0 requantize chains, 1 predicted requantize/reformat sites, 1 errors, 1 warnings")
    data = report.to_dict()
    assert data["model"] == "m.onnx" and data["summary"] == report.summary() and data["stats"] is report.stats
    assert [f["reformat"] for f in data["findings"]] == [False, True, False]
    assert set(data["findings"][0]) == {"severity", "code", "node", "message", "fix", "op", "reformat"}
    assert LintReport().summary().startswith("coverage n/a (no weighted ops with known shapes), 0/0 weighted")


def test_format_table():
    report = _report()
    lines = report.format_table(width=30).splitlines()
    assert lines[0].split() == ["SEVERITY", "NODE", "OP", "FINDING", "FIX"] and set(lines[1]) == {"-"}
    rows = [line.split()[0] for line in lines[2:] if line and not line.startswith(" ")]
    assert rows[:2] == ["error", "warning"]  # sorted by severity; int8-eligible rows hidden by default
    assert "..." + "n" * 57 in lines[2] and "/a/very" not in lines[2]  # long node names keep their tail
    assert all(len(line) < 200 for line in lines)  # findings wrapped at 30 characters
    assert "float layers (MACs at batch 1):" in lines
    assert "  conv2 (Conv): 1,234,567 MACs, weight not quantized [skipped on purpose]" in lines
    assert lines[-1] == report.summary()
    assert "int8-eligible" in report.format_table(show_int8=True)
    assert "(no findings)" in LintReport().format_table()
