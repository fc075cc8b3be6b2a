"""Smoke runs of the benchmark scripts in benchmarks/ on a tiny problem: they run end to end and print their
tables with ratios (timings themselves are not asserted; see benchmarks/README.md)."""
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)


def test_bench_qat_step_breakdown(tmp_path, capsys):
    import bench_qat_step

    out = tmp_path / "qat.json"
    assert bench_qat_step.main(["--threads", "1", "--batch", "2", "--imgsz", "32", "--steps", "2", "--warmup", "1",
                                "--no-rss", "--variants", "fp32", "trt_qat", "--breakdown", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fp32", "trt_qat", "trt_qat-weights", "trt_qat-acts"}
    assert rows["fp32"]["ratio_to_fp32"] == 1.0 and all(r["ratio_to_fp32"] > 0 for r in rows.values())
    assert "trt_qat-acts" in capsys.readouterr().out


def test_bench_calib_passes_floor_and_amax(tmp_path, capsys):
    import bench_calib

    out = tmp_path / "calib.json"
    assert bench_calib.main(["--threads", "1", "--batch", "2", "--imgsz", "32", "--batches", "2", "--rounds", "1",
                             "--ref-quantizers", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["passes"]] == ["forward", "calib-max", "calib-hist", "pq-hist"]
    assert data["count_floor"]["elements"] > 0 and data["count_floor"]["bincount_ms"] > 0
    amax = {r["method"]: r for r in data["compute_amax"]}
    assert set(amax) == {"percentile", "mse", "entropy"}
    assert all(r["max_rel_amax_diff"] <= 0.01 for r in amax.values())  # same amax as pytorch-quantization's
    text = capsys.readouterr().out
    assert "counting floor" in text and "compute_amax" in text


def test_bench_scripts_refuse_cuda_without_a_gpu():
    import bench_calib
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(SystemExit):
        bench_calib.main(["--device", "cuda"])


def test_distill_ablation_table_from_a_report():
    import distill_ablation

    report = {"rows": [{"variant": "FP32", "backend": "torch", "map50": 0.9, "map50_95": 0.6},
                       {"variant": "FP32", "backend": "onnxruntime-cpu", "map50": 0.9, "map50_95": 0.6},
                       {"variant": "QAT label-free", "backend": "onnxruntime-cpu", "map50": 0.9, "map50_95": 0.59}]}
    rows = distill_ablation.ablation_rows(report)
    assert [r[0] for r in rows] == ["FP32", "QAT label-free"] and rows[1][3] == pytest.approx(-1.0)
    assert "| QAT label-free | 0.9000 | 0.5900 | -1.00 |" in distill_ablation.format_table(rows)
