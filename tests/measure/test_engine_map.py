"""GPU: the demo detector's INT8 engine has the same mAP as ONNX Runtime on the same Q/DQ ONNX (within 0.3 points).

Skipped with a reason where TensorRT or a CUDA GPU is missing (this is the case on CPU-only CI).
"""
import copy
from pathlib import Path

import pytest
import torch

WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "yolo-n_digits-det.pt"


@pytest.mark.gpu
def test_engine_map_matches_onnxruntime(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (use the Docker image, docker/README.md)")
    pytest.importorskip("pycuda", reason="pycuda is not installed (pip install trt-qat[trt])")
    from trt_qat.trt import build as be
    from trt_qat.trt.util import gpu_info

    if gpu_info()["compute_capability"] is None:
        pytest.skip("no CUDA GPU visible")
    import trt_qat
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.data.digits_det import generate_digits_det
    from trt_qat.data.yolo import YoloDataset
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.models.yolo import load_checkpoint
    from trt_qat.runners.onnxrt import OnnxrtRunner
    from trt_qat.runners.trt import TrtRunner

    data = generate_digits_det(tmp_path / "data", n_train=8, n_val=64, n_calib=32)
    fp32, _ = load_checkpoint(WEIGHTS)
    sample = torch.zeros(1, 3, 128, 128)
    model = trt_qat.quantize(copy.deepcopy(fp32), sample_input=sample)
    trt_qat.calibrate(model, build_dataloader(YoloDataset(data, "calib"), batch_size=16), method="percentile",
                      progress=False)
    onnx_path = trt_qat.export_onnx(model, sample, tmp_path / "qdq.onnx")
    engine = be.build_engine(onnx_path, tmp_path / "qdq.engine", precision="int8", batch=(1, 16, 16))
    val = YoloDataset(data, "val")
    with OnnxrtRunner(onnx_path) as ort_runner:
        ort = evaluate(ort_runner, val, batch_size=16)
    with TrtRunner(engine) as trt_runner:
        eng = evaluate(trt_runner, val, batch_size=16, pad_to_batch=True)
    assert abs(eng["map50_95"] - ort["map50_95"]) <= 0.003, (eng, ort)
