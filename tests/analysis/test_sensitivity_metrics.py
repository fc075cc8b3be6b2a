"""Sensitivity metrics: SQNR values, and the mAP metric against the evaluation it wraps."""
import math

import pytest
import torch

import trt_qat
from trt_qat.analysis.metrics import SQNR_CAP_DB, map_metric, sqnr


def test_sqnr_values():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr(ref, ref) == SQNR_CAP_DB
    assert sqnr(ref, ref + torch.tensor([0.5, 0.0])) == pytest.approx(10 * math.log10(25 / 0.25))
    two = torch.tensor([[100.0, 1.0], [100.0, 1.0]])
    noisy = two + torch.tensor([[0.0, 0.1], [0.0, 0.1]])
    assert sqnr(two, noisy) > 50 and sqnr(two, noisy, dim=-1) == pytest.approx((SQNR_CAP_DB + 20.0) / 2)


def test_map_metric_matches_evaluate(calibrated):
    from trt_qat.data.yolo import YoloDataset
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.runners.torch_runner import TorchRunner

    _, data, ckpt, _ = calibrated
    model, _ = trt_qat.load_quantized(ckpt)
    ds = YoloDataset(data, "val")
    fn = map_metric(ds, batch_size=4, max_images=4)
    assert fn(model) == evaluate(TorchRunner(model), ds, batch_size=4, max_images=4)["map50_95"]
