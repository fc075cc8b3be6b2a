"""Runners: ONNX Runtime for real on CPU; the TensorRT runner's CPU-side errors, and its GPU paths (marked gpu)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from fixtures_onnx import make_qdq_convnet

from trt_qat.errors import TrtQatError
from trt_qat.runners.onnxrt import OnnxrtRunner, resolve_providers


@pytest.fixture
def qdq_onnx(tmp_path):
    return make_qdq_convnet(tmp_path / "net.onnx")


def test_onnxrt_runner_runs_on_cpu(qdq_onnx):
    runner = OnnxrtRunner(qdq_onnx, intra_op_threads=1, name="ort-int8")
    with runner:
        assert runner.input_names == ["images"]
        assert runner.output_names == ["out"]
        assert runner.input_shapes["images"][1:] == (3, 8, 8)
        assert runner.active_providers[0] == "CPUExecutionProvider"
        x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
        out = runner.infer({"images": x})
        assert list(out) == ["out"] and out["out"].shape == (2, 2, 8, 8)
        # single-array feed for a single-input model; dynamic batch
        out3 = runner.infer(np.concatenate([x, x[:1]]))
        np.testing.assert_allclose(out3["out"][:2], out["out"], rtol=1e-5, atol=1e-5)
        assert runner.last_inference_time() > 0
    assert not runner.is_active


def test_onnxrt_runner_from_bytes(qdq_onnx):
    with OnnxrtRunner(qdq_onnx.read_bytes()) as runner:
        assert runner.infer({"images": np.zeros((1, 3, 8, 8), np.float32)})["out"].shape == (1, 2, 8, 8)


def test_onnxrt_runner_errors(tmp_path, qdq_onnx):
    with pytest.raises(TrtQatError, match="does not exist"):
        OnnxrtRunner(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02")
    with pytest.raises(TrtQatError, match="corrupt or not an ONNX model") as exc:
        OnnxrtRunner(bad).activate()
    assert "\n" not in str(exc.value)
    runner = OnnxrtRunner(qdq_onnx)
    with pytest.raises(TrtQatError, match="not active"):
        runner.infer({"images": np.zeros((1, 3, 8, 8), np.float32)})
    with runner:
        with pytest.raises(TrtQatError, match="missing inputs"):
            runner.infer({"x": np.zeros((1, 3, 8, 8), np.float32)})
        with pytest.raises(TrtQatError, match="expects float32"):
            runner.infer({"images": np.zeros((1, 3, 8, 8), np.float64)})
        with pytest.raises(TrtQatError, match="inference failed"):
            runner.infer({"images": np.zeros((1, 5, 8, 8), np.float32)})


def test_resolve_providers():
    import onnxruntime as ort

    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(TrtQatError, match="unknown ONNX Runtime provider"):
        resolve_providers(["tpu"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(TrtQatError, match="onnxruntime-gpu"):
            resolve_providers("cuda,cpu")
    else:
        assert resolve_providers("cuda")[0] == "CUDAExecutionProvider"


# --- TensorRT runner ----------------------------------------------------------------------------------
def test_trt_runner_without_tensorrt_says_how_to_get_it(tmp_path, monkeypatch):
    from trt_qat.runners import trt as trt_runner

    engine = tmp_path / "x.engine"
    engine.write_bytes(b"\x00" * 16)
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(TrtQatError, match="TensorRT is not installed.*docker/README.md.*pypi.nvidia.com"):
            trt_runner.TrtRunner(engine).activate()
    with pytest.raises(TrtQatError, match="does not exist"):
        trt_runner.TrtRunner(tmp_path / "missing.engine")


def _require_trt_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (use the Docker image)")
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip("no CUDA device")
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"CUDA is not usable: {exc}")
    return trt


@pytest.mark.gpu
def test_trt_runner_dynamic_batch_matches_ort(tmp_path, qdq_onnx):
    _require_trt_gpu()
    from trt_qat.runners.trt import TrtRunner
    from trt_qat.trt.build import build_engine

    engine = build_engine(qdq_onnx, tmp_path / "net.engine", precision="int8",
                          shapes={"images": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))},
                          timing_cache=str(tmp_path / "timing.cache"))
    rng = np.random.default_rng(3)
    with OnnxrtRunner(qdq_onnx) as ort_runner, TrtRunner(engine) as trt_runner:
        for batch in (1, 4, 2):  # growing then shrinking batch: buffers re-allocated, then reused
            x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
            ref = ort_runner.infer({"images": x})["out"]
            got = trt_runner.infer({"images": x})["out"]
            assert got.shape == ref.shape
            cos = float(np.dot(ref.ravel(), got.ravel()) /
                        (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-12))
            assert cos > 0.99
        timings = trt_runner.last_timings()
        assert set(timings) == {"h2d_ms", "compute_ms", "d2h_ms", "enqueue_ms"}
        assert timings["compute_ms"] > 0


@pytest.mark.gpu
def test_trt_runner_refuses_metadata_mismatch(tmp_path, qdq_onnx):
    _require_trt_gpu()
    import json

    from trt_qat.runners.trt import TrtRunner
    from trt_qat.trt.build import build_engine

    engine = build_engine(qdq_onnx, tmp_path / "net.engine", precision="fp16",
                          timing_cache=str(tmp_path / "timing.cache"))
    meta_path = engine.with_name(engine.name + ".json")
    meta = json.loads(meta_path.read_text())
    meta["trt_version"] = "8.5.0.1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TrtQatError, match="TensorRT 8.5.0.1") as exc:
        TrtRunner(engine).activate()
    assert "\n" not in str(exc.value)
