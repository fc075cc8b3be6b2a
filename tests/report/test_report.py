"""Reports: tables, deltas, Pareto front, plots and merging eval + bench JSON from the CLI."""
import json

import pytest

from trt_qat.cli.report import main
from trt_qat.report.write import format_markdown_table, merge_rows, pareto_front, write_report


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.6), (3.0, 0.55), (0.5, 0.4)]
    assert pareto_front(pts) == [3, 0, 1]


def test_table_has_deltas_and_states_missing_values():
    md = format_markdown_table([{"variant": "FP32", "backend": "torch", "map50": 0.9, "map50_95": 0.5},
                                {"variant": "QAT", "backend": "ort", "map50": 0.9, "map50_95": 0.49}])
    assert "-1.00" in md and "n/a" in md


def test_write_report_files(tmp_path):
    rows = [{"variant": "FP32", "backend": "torch", "map50": 0.9, "map50_95": 0.5, "latency_ms_p50": 2.0},
            {"variant": "QAT", "backend": "ort", "map50": 0.9, "map50_95": 0.49, "latency_ms_p50": 1.0}]
    md = write_report(rows, tmp_path, meta={"x": 1}, sections=[("Lint", "ok")])
    assert md.read_text().count("|") > 10
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["rows"][1]["delta_map50_95"] == pytest.approx(-1.0)
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Lint" in html


def test_merge_eval_and_bench_json_from_cli(tmp_path, capsys):
    ev = {"variant": "model_qat_qdq", "backend": "onnxruntime", "precision": "int8 (Q/DQ)", "batch": 16,
          "map50": 0.95, "map50_95": 0.58}
    bench = {"model": "out/model_qat_qdq.onnx", "backend": "ort", "precision": "int8", "batch": 1,
             "Throughput (qps)": 300.0, "summary": {"latency_ms_median": 3.3, "latency_ms_p99": 4.5, "qps": 300.0}}
    (tmp_path / "e.json").write_text(json.dumps(ev))
    (tmp_path / "b.json").write_text(json.dumps(bench))
    assert main([str(tmp_path / "e.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert len(rows) == 1
    assert rows[0]["map50_95"] == 0.58 and rows[0]["latency_ms_p50"] == 3.3 and rows[0]["precision"] == "int8 (Q/DQ)"
    assert merge_rows([ev, ev]) == [ev]


def test_report_bad_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "bad.json"), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("content, msg", [
    (b"\xff\xfe\x00\x01", "as JSON"),
    (b"[1, 2, 3]", "no report rows"),
    (b'{"rows": "abc"}', "no report rows"),
    (b"[]", "no report rows"),
    (b'[{"variant": "QAT", "map50_95": "high"}]', "is not a number"),
])
def test_report_inputs_that_are_not_rows_are_one_line(tmp_path, capsys, content, msg):
    from trt_qat.cli.report import main

    path = tmp_path / "in.json"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
