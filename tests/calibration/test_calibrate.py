"""Calibration through the public API, on tensors with known statistics."""
import pytest
import torch
from torch import nn

import trt_qat
from trt_qat.config import QuantConfig
from trt_qat.errors import TrtQatError


def _one_conv():
    m = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False))
    return trt_qat.quantize(m, QuantConfig(rules=False))


def test_max_of_a_known_tensor():
    m = _one_conv()
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = -3.5
    x[0, 0, 0, 0] = 2.0
    trt_qat.calibrate(m, [x, x * 0.5], method="max", progress=False)
    assert float(m[0]._input_quantizer.amax) == pytest.approx(3.5)
    # weights: per-channel absolute max
    expected = m[0].weight.detach().abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(m[0]._weight_quantizer.amax.flatten(), expected)


def test_percentile_of_a_uniform_sample():
    torch.manual_seed(0)
    m = _one_conv()
    data = [torch.rand(4, 1, 64, 64) * 10.0 for _ in range(4)]  # |x| ~ U(0, 10)
    trt_qat.calibrate(m, data, method="percentile", percentile=90.0, progress=False)
    assert float(m[0]._input_quantizer.amax) == pytest.approx(9.0, rel=0.01)


def test_all_methods_from_one_pass_give_finite_positive_amax():
    torch.manual_seed(0)
    m = _one_conv()
    data = [torch.randn(2, 1, 32, 32) for _ in range(3)]
    trt_qat.collect_stats(m, data, progress=False)
    values = {}
    for method in ("max", "percentile", "mse", "entropy"):
        trt_qat.compute_amax(m, method)
        a = float(m[0]._input_quantizer.amax)
        assert 0 < a < float("inf")
        values[method] = a
    assert values["max"] >= values["percentile"] and values["max"] >= values["mse"]


@pytest.mark.parametrize("batch", [
    lambda x: x, lambda x: (x, torch.zeros(1)), lambda x: [x], lambda x: {"images": x}, lambda x: {"img": x}])
def test_batch_formats(batch):
    m = _one_conv()
    trt_qat.calibrate(m, [batch(torch.ones(1, 1, 2, 2) * 2)], method="max", progress=False)
    assert float(m[0]._input_quantizer.amax) == pytest.approx(2.0)


def test_bad_batches_and_methods():
    m = _one_conv()
    with pytest.raises(TrtQatError, match="'images'"):
        trt_qat.calibrate(m, [{"pixels": torch.ones(1, 1, 2, 2)}], method="max", progress=False)
    with pytest.raises(TrtQatError, match="unknown calibration method"):
        trt_qat.calibrate(m, [torch.ones(1, 1, 2, 2)], method="kl", progress=False)
    with pytest.raises(TrtQatError, match="no activation quantizers"):
        trt_qat.calibrate(nn.Sequential(nn.ReLU()), [torch.ones(1)], progress=False)


def test_zero_only_input_gets_tiny_positive_amax():
    m = _one_conv()
    trt_qat.calibrate(m, [torch.zeros(1, 1, 2, 2)], method="percentile", progress=False)
    assert 0 < float(m[0]._input_quantizer.amax) <= 1e-6


def test_calibration_runs_on_the_models_device_and_restores_mode():
    m = _one_conv().train()
    trt_qat.calibrate(m, [torch.randn(1, 1, 4, 4)], method="mse", progress=False, device="cpu")
    assert m.training
    assert m[0]._input_quantizer._if_quant and not m[0]._input_quantizer._if_calib


def test_dead_weight_channel_does_not_poison_calibration():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        m[0].weight[0] = 0  # a pruned / dead filter
    trt_qat.quantize(m, QuantConfig(rules=False))
    trt_qat.calibrate(m, [torch.randn(2, 3, 8, 8) for _ in range(2)], method="percentile", progress=False)
    for _, q in trt_qat.iter_quantizers(m):
        assert torch.isfinite(q.amax).all() and (q.amax > 0).all()
    assert torch.isfinite(m(torch.randn(1, 3, 8, 8))).all()


def test_nan_activations_are_one_clear_error():
    m = _one_conv()
    with pytest.raises(TrtQatError, match="non-finite amax"):
        trt_qat.calibrate(m, [torch.full((1, 1, 2, 2), float("nan"))], method="entropy", progress=False)
