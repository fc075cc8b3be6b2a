"""trt.build: build_engine's CPU-side checks for real through the CLI (ONNX, Q/DQ, opset, shape flags, missing
TensorRT); builds marked gpu. Shape parsing and metadata have their own tests (test_profile, test_metadata)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import onnx
import pytest
from fixtures_onnx import make_qdq_convnet

from trt_qat.cli import build as build_cli
from trt_qat.trt.build import build_engine
from trt_qat.trt.metadata import file_sha256, read_engine_metadata
from trt_qat.trt.util import gpu_info

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def run_main_error(capsys, argv) -> str:
    """Run main(argv), expect exit code 2 and exactly one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exc:
        build_cli.main(argv)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("trt_qat: error: ")
    return lines[0]


# --- CLI: one line and exit 2 for each bad input -------------------------------------------------------------
def test_main_corrupt_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 definitely not protobuf \xff\xfe")
    assert "corrupt or not an ONNX model" in run_main_error(capsys, ["--onnx", str(bad)])


def test_main_not_onnx(tmp_path, capsys):
    text = tmp_path / "notes.onnx"
    text.write_text("")
    assert "is not an ONNX model" in run_main_error(capsys, ["--onnx", str(text)])
    assert "does not exist" in run_main_error(capsys, ["--onnx", str(tmp_path / "nope.onnx")])


def test_main_int8_without_qdq(fp32_onnx, capsys):
    line = run_main_error(capsys, ["--onnx", str(fp32_onnx), "--precision", "int8"])
    assert "run `trt-qat calibrate`" in line and "qat" in line


def test_main_fp16_on_qdq_onnx(qdq_onnx, capsys):
    assert "--precision int8" in run_main_error(capsys, ["--onnx", str(qdq_onnx), "--precision", "fp16"])


def test_main_qdq_needs_opset13(tmp_path, capsys):
    model = onnx.load(str(make_qdq_convnet(tmp_path / "n.onnx")))
    model.opset_import[0].version = 10
    old = tmp_path / "old_opset.onnx"
    onnx.save(model, str(old))
    assert "opset >= 13" in run_main_error(capsys, ["--onnx", str(old)])


@pytest.mark.parametrize("flags, msg", [
    (["--optShapes", "images:4x3"], "rank 2"),
    (["--minShapes", "images:1by3"], "integers"),
    (["--batch", "1:x:8"], "--batch"),
    (["--batch", "8:4:1"], "MIN <= OPT <= MAX"),
    (["--maxShapes", "input0:1x3x8x8"], "unknown inputs"),
    (["--workspace", "0"], "positive"),
    (["--builderOptimizationLevel", "9"], "0..5"),
])
def test_main_bad_flags(qdq_onnx, capsys, flags, msg):
    assert msg in run_main_error(capsys, ["--onnx", str(qdq_onnx)] + flags)


def test_main_outputs_are_checked_before_the_build(qdq_onnx, tmp_path, capsys):
    """--saveEngine, its .json metadata and --timingCache: never the input ONNX, never a directory; refused before
    TensorRT is touched (so these run without it)."""
    before = qdq_onnx.read_bytes()
    for flags, msg in ((["--saveEngine", str(qdq_onnx)], "--saveEngine"),
                       (["--timingCache", str(qdq_onnx)], "--timingCache"),
                       (["--saveEngine", str(qdq_onnx.with_suffix(".engine"))], None),
                       (["--saveEngine", str(tmp_path)], "is a directory")):
        if msg is None:  # (the engine's metadata path is <engine>.json: not the input here, so TensorRT is reached)
            continue
        assert msg in run_main_error(capsys, ["--onnx", str(qdq_onnx), *flags])
    assert qdq_onnx.read_bytes() == before


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_main_missing_tensorrt_says_how_to_get_it(qdq_onnx, capsys):
    line = run_main_error(capsys, ["--onnx", str(qdq_onnx), "--batch", "1:2:4"])
    assert "TensorRT is not installed" in line
    assert "docker/README.md" in line and "pypi.nvidia.com" in line


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        build_cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--onnx", "--saveEngine", "--precision", "--no-fp16", "--minShapes", "--optShapes", "--maxShapes",
                 "--batch", "--workspace", "--timingCache", "--builderOptimizationLevel", "--useDLACore",
                 "--allowGPUFallback", "--stronglyTyped", "--verbose"):
        assert flag in out


def test_modules_import_without_tensorrt_pycuda_onnxruntime():
    code = ("import sys; import trt_qat.build_engine, trt_qat.trt.plan, trt_qat.trt.build, trt_qat.trt.profile, "
            "trt_qat.trt.metadata, trt_qat.trt.util, trt_qat.onnx.fp16, "
            "trt_qat.benchmark, trt_qat.measure.compare, trt_qat.runners.trt, trt_qat.runners.onnxrt; "
            "heavy = [m for m in ('tensorrt', 'pycuda', 'onnxruntime') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- GPU: real builds -------------------------------------------------------------------------------------
def _require_trt_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (use the Docker image, docker/README.md)")
    info = gpu_info()
    if info["compute_capability"] is None:
        pytest.skip("no CUDA GPU visible")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_each_precision(tmp_path, qdq_onnx, fp32_onnx, precision):
    _require_trt_gpu()
    import tensorrt as trt

    onnx_path = qdq_onnx if precision == "int8" else fp32_onnx
    cache = tmp_path / "timing.cache"
    engine = build_engine(onnx_path, tmp_path / f"net_{precision}.engine", precision=precision,
                          shapes={"images": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))}, timing_cache=str(cache))
    assert engine.is_file() and engine.stat().st_size > 0 and cache.is_file()
    meta = read_engine_metadata(engine)
    assert meta["trt_version"] == trt.__version__ and meta["precision"] == precision
    assert meta["onnx_sha256"] == file_sha256(onnx_path)
    assert meta["profile"]["images"] == [[1, 3, 8, 8], [2, 3, 8, 8], [4, 3, 8, 8]]
    assert meta["compute_capability"] and meta["build_seconds"] > 0

    from trt_qat.measure.compare import compare_runners
    from trt_qat.runners.onnxrt import OnnxrtRunner
    from trt_qat.runners.trt import TrtRunner

    rng = np.random.default_rng(0)
    feeds = [{"images": rng.standard_normal((b, 3, 8, 8)).astype(np.float32)} for b in (1, 3)]
    report = compare_runners([OnnxrtRunner(onnx_path), TrtRunner(engine)], feeds, {"cosine": 0.99})
    assert report["ok"], report


@pytest.mark.gpu
def test_build_strongly_typed_on_trt10(tmp_path, qdq_onnx):
    _require_trt_gpu()
    import tensorrt as trt

    if int(trt.__version__.split(".")[0]) < 10:
        pytest.skip(f"strongly typed needs TensorRT >= 10, this is {trt.__version__}")
    engine = build_engine(qdq_onnx, tmp_path / "strong.engine", precision="int8", strongly_typed=True,
                          timing_cache=None)
    meta = read_engine_metadata(engine)
    assert meta["strongly_typed"] and meta["onnx_converted_to_fp16"] and meta["builder_flags"] == []
