"""Hostile inputs to `trt-qat report`: JSON that holds no report rows, outputs that would overwrite an input (one
line each, exit code 2, nothing written, no input changed), and non-finite numbers (``null`` in strict JSON,
"n/a" in Markdown and HTML)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_cli import one_line_error

from trt_qat.__main__ import main
from trt_qat.report.write import REPORT_FILES, format_markdown_table, load_rows, report_files, write_report

EVAL_ROW = {"variant": "model_qat_qdq", "backend": "onnxruntime", "precision": "int8 (Q/DQ)", "batch": 16,
            "map50": 0.95, "map50_95": 0.58}




def strict_json(path):
    """Parse ``path`` refusing NaN / Infinity, as strict JSON readers do."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.mark.parametrize("content, msg", [
    ('{"foo": 1}', "row 1 is not a report row (keys: foo)"),
    ('[{"a": 1}, {"b": 2}]', "row 1 is not a report row (keys: a)"),
    ('[{"variant": "FP32", "map50_95": 0.5}, {"b": 2}]', "row 2 is not a report row (keys: b)"),
    ('{"rows": [{"name": "x", "score": 0.5}]}', "row 1 is not a report row"),
    ('{"variant": "QAT", "backend": "ort", "precision": "int8"}', "needs a variant name and at least one metric"),
    ('{"map50_95": 0.5}', "needs a variant name"),
    ('{"variant": "", "map50_95": 0.5}', "needs a variant name"),
    ('{"variant": 7, "map50_95": 0.5}', "needs a variant name"),
    ('{"Throughput (qps)": 300.0}', "a bench result its model"),
    ('{"model": "", "Throughput (qps)": 300.0}', "a bench result its model"),
    ('{"model": "m.onnx", "Throughput (qps)": "fast"}', "is not a number"),
    ('{"model": "m.onnx", "Throughput (qps)": 1, "summary": {"latency_ms_median": [1]}}', "is not a number"),
])
def test_unrelated_json_is_refused_in_one_line(tmp_path, capsys, content, msg):
    path = tmp_path / "in.json"
    path.write_text(content)
    out = tmp_path / "r"
    line = one_line_error(capsys, ["report", str(path), "--out", str(out)], tmp_path)
    assert msg in line and "pass eval/bench JSON files" in line, line
    assert not out.exists()


def test_one_bad_file_among_good_ones_writes_nothing(tmp_path, capsys):
    (tmp_path / "e.json").write_text(json.dumps(EVAL_ROW))
    (tmp_path / "x.json").write_text('{"foo": 1}')
    line = one_line_error(capsys, ["report", str(tmp_path / "e.json"), str(tmp_path / "x.json"), "--out",
                                   str(tmp_path / "r")], tmp_path)
    assert "x.json" in line and not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", REPORT_FILES)
def test_out_whose_report_files_are_inputs_is_refused(tmp_path, capsys, name):
    out = tmp_path / "r"
    out.mkdir()
    inp = out / name
    inp.write_text(json.dumps({"rows": [EVAL_ROW]}))
    line = one_line_error(capsys, ["report", str(inp), "--out", str(out)], tmp_path)
    assert "would destroy the input" in line and "--out" in line, line
    twin = tmp_path / "r" / ".." / "r"  # the same directory spelled differently
    line = one_line_error(capsys, ["report", str(inp), "--out", str(twin)], tmp_path)
    assert "would destroy the input" in line, line
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_report_files_lists_what_write_report_writes(tmp_path):
    rows = [{"variant": "FP32", "backend": "torch", "map50": 0.9, "map50_95": 0.5, "latency_ms_p50": 2.0},
            {"variant": "QAT", "backend": "ort", "map50": 0.9, "map50_95": 0.49, "latency_ms_p50": 1.0}]
    write_report(rows, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in report_files(tmp_path))


def test_non_finite_numbers_are_null_in_json_and_na_in_md_html(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text('[{"variant": "FP32", "backend": "torch", "map50": NaN, "map50_95": NaN, "qps": Infinity},'
                   ' {"variant": "QAT", "backend": "ort", "map50": 0.9, "map50_95": 0.5,'
                   ' "latency_ms_p50": -Infinity}]')
    before = src.read_bytes()
    assert main(["report", str(src), "--out", str(tmp_path / "r")]) == 0
    assert src.read_bytes() == before
    doc = strict_json(tmp_path / "r" / "report.json")
    fp32, qat = doc["rows"]
    assert fp32["map50"] is None and fp32["map50_95"] is None and fp32["qps"] is None
    assert qat["latency_ms_p50"] is None and qat["map50_95"] == 0.5 and "delta_map50_95" not in qat
    md = (tmp_path / "r" / "report.md").read_text()
    html = (tmp_path / "r" / "report.html").read_text()
    for text in (md, html):
        assert "nan" not in text.lower().replace("n/a", "") and "inf" not in text.lower()
    assert md.splitlines()[4].count("n/a") >= 4  # the FP32 row


def test_write_report_api_writes_strict_json(tmp_path):
    rows = [{"variant": "FP32", "map50_95": float("nan"), "qps": float("inf")}]
    write_report(rows, tmp_path, meta={"threshold": float("-inf"), "ok": 1.5})
    doc = strict_json(tmp_path / "report.json")
    assert doc["rows"][0]["map50_95"] is None and doc["rows"][0]["qps"] is None
    assert doc["meta"] == {"threshold": None, "ok": 1.5}
    assert "n/a" in format_markdown_table([{"variant": "x", "map50_95": float("nan"), "qps": float("inf")}])
    assert rows[0]["qps"] == float("inf")  # the caller's rows are not changed


def test_real_rows_still_load(tmp_path):
    bench = {"model": "out/model_qat_qdq.onnx", "backend": "ort", "batch": 1, "Throughput (qps)": 300.0,
             "summary": {"latency_ms_median": 3.3, "latency_ms_p99": 4.5, "qps": 300.0}}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    (tmp_path / "e.json").write_text(json.dumps({**EVAL_ROW, "map50": None}))
    assert load_rows(tmp_path / "b.json") == [bench]
    assert load_rows(tmp_path / "e.json")[0]["map50"] is None
