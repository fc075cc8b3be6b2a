"""The calibrated yolo-n checkpoint on a tiny digits-det set, shared by the metric and CLI tests of the analysis."""
import pytest
import torch

import trt_qat
from trt_qat.analysis.toggle import list_layers


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory):
    """``(root dir, data.yaml, quantized.pt, number of quantized layers)``; built once, on first use."""
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.data.digits_det import generate_digits_det
    from trt_qat.data.yolo import YoloDataset
    from trt_qat.models.yolo import build_model

    root = tmp_path_factory.mktemp("sens")
    data = generate_digits_det(root / "digits", n_train=8, n_val=8, n_calib=8)
    torch.manual_seed(0)
    model = build_model("yolo-n").eval()
    trt_qat.quantize(model, trt_qat.QuantConfig())
    trt_qat.calibrate(model, build_dataloader(YoloDataset(data, "calib"), batch_size=8), method="max",
                      progress=False)
    ckpt = trt_qat.save_quantized(model, root / "quantized.pt")
    return root, data, ckpt, len(list_layers(model))
