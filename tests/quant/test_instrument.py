"""Instrumentation: which layers get which quantizers, skip rules, CPU-safe save/load."""
import pytest
import torch
from pytorch_quantization import nn as quant_nn
from torch import nn

import trt_qat
from trt_qat.config import QuantConfig
from trt_qat.errors import TrtQatError
from trt_qat.quant.instrument import check_amax
from trt_qat.quant.quantizer import TrtQuantizer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 4, 1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.pool(self.up(self.stem(x)))
        return self.head(self.gap(x).flatten(1))


def test_layers_get_trt_style_quantizers():
    m = trt_qat.quantize(Net(), QuantConfig(rules=False))
    assert isinstance(m.stem, quant_nn.QuantConv2d)
    assert isinstance(m.conv1d, quant_nn.QuantConv1d)
    assert isinstance(m.up, quant_nn.QuantConvTranspose2d)
    assert isinstance(m.head, quant_nn.QuantLinear)
    assert isinstance(m.pool, quant_nn.QuantMaxPool2d)
    assert isinstance(m.gap, quant_nn.QuantAdaptiveAvgPool2d)
    # per-channel weights: axis 0 for conv/linear, axis 1 for ConvTranspose; per-tensor activations
    assert m.stem._weight_quantizer.axis == 0 and m.head._weight_quantizer.axis == 0
    assert m.up._weight_quantizer.axis == 1
    for mod in (m.stem, m.up, m.head, m.pool):
        assert isinstance(mod._input_quantizer, TrtQuantizer) and mod._input_quantizer.axis is None
    # parameters are shared, not copied
    assert m.stem.weight.data_ptr() == m.stem.weight.data_ptr()


def test_explicit_swap_does_not_patch_torch_nn():
    trt_qat.quantize(Net(), QuantConfig(rules=False))
    assert nn.Conv2d is torch.nn.modules.conv.Conv2d
    assert type(nn.Conv2d(1, 1, 1)) is nn.Conv2d


def test_skip_patterns_and_min_channels():
    m = trt_qat.quantize(Net(), QuantConfig(skip=[r"^head$"], min_channels=16, rules=False))
    assert type(m.head) is nn.Linear
    assert type(m.stem) is nn.Conv2d  # 3 input channels < 16 and not a multiple of 8
    assert isinstance(m.up, quant_nn.QuantConvTranspose2d)  # 8 channels: multiple of 8
    reasons = {name: why for name, _, why in m.trt_qat_skipped}
    assert reasons["head"] == "skip pattern" and "min_channels" in reasons["stem"]
    assert "kept in float" in trt_qat.quantizer_summary(m)


def test_quantize_is_idempotent_on_quantized_modules():
    m = trt_qat.quantize(Net(), QuantConfig(rules=False))
    q = m.stem._input_quantizer
    trt_qat.quantize(m, QuantConfig(rules=False))
    assert m.stem._input_quantizer is q


def test_save_load_round_trip_on_cpu(tmp_path):
    torch.manual_seed(0)
    m = trt_qat.quantize(Net(), QuantConfig(rules=False))
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    trt_qat.calibrate(m, data, method="max", progress=False)
    trt_qat.save_quantized(m, tmp_path / "q.pt")
    fresh = Net()
    loaded, _ = trt_qat.load_quantized(tmp_path / "q.pt", model=fresh)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), m.eval()(x))
    assert loaded.stem._input_quantizer.amax.device.type == "cpu"
    check_amax(loaded)


def test_amax_file_round_trip(tmp_path):
    m = trt_qat.quantize(Net(), QuantConfig(rules=False))
    trt_qat.calibrate(m, [torch.randn(2, 3, 8, 8)], method="max", progress=False)
    trt_qat.save_amax(m, tmp_path / "amax.pt")
    other = trt_qat.quantize(Net(), QuantConfig(rules=False))
    n = trt_qat.load_amax(other, tmp_path / "amax.pt")
    assert n == sum(1 for _, q in trt_qat.iter_quantizers(m) if q.amax is not None)
    assert other.conv1d._input_quantizer._disabled  # conv1d never runs in forward
    for (name, q), (name2, q2) in zip(trt_qat.iter_quantizers(m), trt_qat.iter_quantizers(other)):
        assert name == name2
        if q.amax is not None:
            assert torch.equal(q.amax, q2.amax)


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(TrtQatError, match="does not exist"):
        trt_qat.load_quantized(tmp_path / "missing.pt", model=Net())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TrtQatError, match="corrupt"):
        trt_qat.load_quantized(bad, model=Net())
    with pytest.raises(TrtQatError, match="not a trt_qat amax file"):
        torch.save({"x": 1}, tmp_path / "a.pt")
        trt_qat.load_amax(Net(), tmp_path / "a.pt")


def test_quant_config_validation():
    with pytest.raises(TrtQatError, match="num_bits"):
        QuantConfig(num_bits=4)


def test_unused_layer_is_disabled_with_a_warning(caplog):
    m = trt_qat.quantize(Net(), QuantConfig(rules=False))
    trt_qat.calibrate(m, [torch.randn(1, 3, 8, 8)], method="max", progress=False)
    assert m.conv1d._input_quantizer._disabled
    assert "never ran" in caplog.text
    check_amax(m)  # disabled quantizers are not required to have amax


def test_rules_without_a_sample_input_are_not_silently_skipped(caplog):
    """Without a sample input the rules run on the first forward; the summary says which, and rules=False says
    they are off."""
    import logging

    from torch import nn

    from trt_qat.config import QuantConfig
    from trt_qat.quant.instrument import quantize, quantizer_summary

    with caplog.at_level(logging.INFO, logger="trt_qat"):
        m = quantize(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert "placement rules pending" in quantizer_summary(m)
    assert any("first forward" in r.getMessage() for r in caplog.records)
    m(torch.zeros(2, 3, 8, 8))
    assert m.trt_qat_rules_report.trigger == "first forward" and m.trt_qat_rules_input_shape == [1, 3, 8, 8]
    assert "placement rules applied (on the first forward" in quantizer_summary(m)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trt_qat"):
        m = quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantConfig(rules=False))
    assert not any("placement rules" in r.getMessage() for r in caplog.records)
    assert "placement rules off" in quantizer_summary(m)
