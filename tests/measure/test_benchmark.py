"""Benchmark statistics and the trtexec-style summary, for real through ONNX Runtime on CPU."""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from trt_qat.cli import bench as bench_cli
from trt_qat.errors import TrtQatError
from trt_qat.measure import benchmark as bm
from trt_qat.runners.base import BaseRunner
from trt_qat.runners.onnxrt import OnnxrtRunner

FAST = dict(warmup_ms=5, duration_s=0.05, iterations=5)


def test_latency_stats():
    s = bm.latency_stats(range(1, 101))
    assert s["min"] == 1 and s["max"] == 100 and s["count"] == 100
    assert s["mean"] == pytest.approx(50.5) and s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1) and s["p95"] == pytest.approx(95.05) and s["p99"] == pytest.approx(99.01)
    assert s["cv"] == pytest.approx(np.std(np.arange(1, 101)) / 50.5 * 100)
    assert bm.latency_stats([2.0, 2.0])["cv"] == 0.0
    with pytest.raises(TrtQatError, match="no latency samples"):
        bm.latency_stats([])


def test_benchmark_onnxruntime_cpu(qdq_onnx):
    runner = OnnxrtRunner(qdq_onnx, intra_op_threads=1)
    feed = {"images": np.zeros((2, 3, 8, 8), np.float32)}
    result = bm.benchmark(runner, feed, **FAST)
    assert not runner.is_active  # activated and released by benchmark()
    assert result["backend"] == "ort" and result["batch"] == 2 and result["queries"] >= 5
    assert result["Latency"]["count"] == result["queries"]
    assert 0 < result["Latency"]["min"] <= result["Latency"]["median"] <= result["Latency"]["max"]
    assert result["Throughput (qps)"] > 0
    assert result["Throughput (images/s)"] == pytest.approx(2 * result["Throughput (qps)"])
    # the GPU-side metrics are stated as not measured, never estimated
    for name in ("Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency"):
        assert result[name] is None and name in result["not_measured"]
    assert result["latency_source"].startswith("host timer")
    text = bm.format_summary(result)
    assert text.startswith("=== Performance summary ===")
    assert "Throughput:" in text and "qps" in text
    assert "Latency: min = " in text and "percentile(99%)" in text
    assert "Not measured on this backend: Enqueue Time, H2D Latency, GPU Compute Time, D2H Latency" in text
    assert "GPU Compute Time:" not in text


def test_benchmark_gpu_only_options_are_refused_politely_on_ort(qdq_onnx):
    with OnnxrtRunner(qdq_onnx) as runner:
        result = bm.benchmark(runner, np.zeros((1, 3, 8, 8), np.float32), no_data_transfers=True, cuda_graph=True,
                              **FAST)
        assert runner.is_active  # an active runner stays active
    assert any("TensorRT engines only" in w for w in result["warnings"])
    assert result["settings"]["no_data_transfers"] is False


class ScriptedGpuRunner(BaseRunner):
    """A runner whose CUDA-event timings are scripted, to check how benchmark() aggregates them (no GPU)."""

    backend = "scripted"

    def __init__(self, compute_ms):
        super().__init__()
        self.compute_ms = list(compute_ms)
        self.calls = 0
        self.cuda_graph = False

    def input_names_impl(self):
        return ["x"]

    def infer_impl(self, feed):
        self.calls += 1
        return OrderedDict(y=feed["x"])

    def _t(self, h2d, d2h):
        c = self.compute_ms[self.calls % len(self.compute_ms)]
        return {"h2d_ms": h2d, "compute_ms": c, "d2h_ms": d2h, "enqueue_ms": 0.01}

    def last_timings(self):
        return self._t(0.5, 0.25)

    def execute_only(self):
        self.calls += 1
        return self._t(0.0, 0.0)


def test_benchmark_aggregates_gpu_timings_like_trtexec():
    runner = ScriptedGpuRunner([2.0])
    result = bm.benchmark(runner, {"x": np.zeros((4, 1), np.float32)}, **FAST)
    assert result["Latency"]["mean"] == pytest.approx(2.75)  # H2D + compute + D2H
    assert result["H2D Latency"]["median"] == pytest.approx(0.5)
    assert result["GPU Compute Time"]["max"] == pytest.approx(2.0)
    assert result["D2H Latency"]["min"] == pytest.approx(0.25)
    assert result["Enqueue Time"]["mean"] == pytest.approx(0.01)
    assert result["Total GPU Compute Time (s)"] == pytest.approx(2.0e-3 * result["queries"])
    assert result["not_measured"] == [] and result["warnings"] == []
    text = bm.format_summary(result)
    for name in bm.METRICS:
        assert f"{name}: min = " in text

    nodt = bm.benchmark(ScriptedGpuRunner([2.0]), {"x": np.zeros((1, 1), np.float32)}, no_data_transfers=True,
                        **FAST)
    assert nodt["H2D Latency"] is None and nodt["D2H Latency"] is None
    assert nodt["Latency"]["mean"] == pytest.approx(2.0)
    assert nodt["not_measured"] == ["H2D Latency", "D2H Latency"]


def test_benchmark_warns_on_unstable_compute_time():
    result = bm.benchmark(ScriptedGpuRunner([1.0, 3.0]), {"x": np.zeros((1, 1), np.float32)}, **FAST)
    assert result["GPU Compute Time"]["cv"] > 10
    assert any("unstable" in w for w in result["warnings"])
    assert "* GPU compute time is unstable" in bm.format_summary(result)


def test_make_feed(qdq_onnx):
    with OnnxrtRunner(qdq_onnx) as runner:
        assert bm.make_feed(runner)["images"].shape == (1, 3, 8, 8)
        feed = bm.make_feed(runner, batch=3)
        assert feed["images"].shape == (3, 3, 8, 8) and feed["images"].dtype == np.float32
        assert bm.make_feed(runner, shapes={"images": (2, 3, 8, 8)})["images"].shape == (2, 3, 8, 8)


def test_main_ort_prints_summary_and_writes_json(qdq_onnx, tmp_path, capsys):
    out = tmp_path / "reports" / "bench.json"
    rc = bench_cli.main(["--onnx", str(qdq_onnx), "--backend", "ort", "--batch", "2", "--warmUp", "5",
                         "--duration", "0.05", "--iterations", "5", "--threads", "1", "--exportJson", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "=== Performance summary ===" in stdout and "Throughput:" in stdout
    doc = json.loads(out.read_text())
    assert doc["model"] == str(qdq_onnx) and doc["precision"] == "int8" and doc["batch"] == 2
    assert doc["providers"] == ["CPUExecutionProvider"]
    assert doc["GPU Compute Time"] is None and doc["summary"]["qps"] > 0
    assert doc["input_shapes"] == {"images": [2, 3, 8, 8]}


@pytest.mark.parametrize("extra, msg", [
    (["--backend", "trt"], "--backend trt needs --engine"),
    (["--shapes", "other:1x3x8x8"], "unknown inputs"),
    (["--shapes", "images:1x3"], "integers"),
    (["--batch", "0"], "argument --batch: 0 must be >= 1"),
    (["--providers", "tpu"], "unknown ONNX Runtime provider"),
])
def test_main_errors_are_one_line(qdq_onnx, capsys, extra, msg):
    if msg == "integers":
        extra = ["--shapes", "images:1xAx8x8"]
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--onnx", str(qdq_onnx), "--duration", "0", "--warmUp", "0"] + extra)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and msg in lines[0], lines


def test_main_corrupt_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01\x02 garbage")
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--onnx", str(bad)])
    assert exc.value.code == 2
    assert "corrupt or not an ONNX model" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        bench_cli.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--engine", "--onnx", "--backend", "--batch", "--shapes", "--warmUp", "--duration", "--iterations",
                 "--useCudaGraph", "--noDataTransfers", "--exportJson", "--threads", "--providers"):
        assert flag in out


@pytest.mark.gpu
def test_benchmark_trt_engine(tmp_path, qdq_onnx):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (use the Docker image, docker/README.md)")
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    from trt_qat.runners.trt import TrtRunner
    from trt_qat.trt.build import build_engine
    from trt_qat.trt.util import gpu_info

    if gpu_info()["compute_capability"] is None:
        pytest.skip("no CUDA GPU visible")
    engine = build_engine(qdq_onnx, tmp_path / "n.engine", precision="int8", timing_cache=None,
                          shapes={"images": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))})
    feed = {"images": np.zeros((2, 3, 8, 8), np.float32)}
    for kwargs in ({}, {"no_data_transfers": True}, {"cuda_graph": True}):
        result = bm.benchmark(TrtRunner(engine), feed, **FAST, **kwargs)
        assert result["GPU Compute Time"]["median"] > 0
        assert result["Latency"]["median"] >= result["GPU Compute Time"]["min"]
