"""The public API on a model the project did not write: a small CNN classifier on a tensor dataset."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trt_qat
from trt_qat.errors import TrtQatError


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
    return TensorDataset(x, y)


def test_quantize_calibrate_finetune_export_ort(tmp_path):
    model = _classifier()
    loader = DataLoader(_data(), batch_size=16)
    trt_qat.quantize(model)
    names = [n for n, _ in trt_qat.iter_quantizers(model)]
    assert "0._weight_quantizer" in names and "8._input_quantizer" in names and "3._input_quantizer" in names
    trt_qat.calibrate(model, loader, method="percentile", progress=False)
    for _, q in trt_qat.iter_quantizers(model):
        assert torch.isfinite(q.amax).all() and (q.amax > 0).all()

    def loss_fn(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x), y)

    before = model[0].weight.detach().clone()
    result = trt_qat.finetune(model, loader, loss_fn, epochs=1, lr=1e-3, checkpoint_dir=tmp_path / "ck",
                              progress=False)
    assert len(result["history"]) == 1 and (tmp_path / "ck" / "last.pt").is_file()
    assert not torch.equal(before, model[0].weight)

    path = trt_qat.export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 5

    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _data(8).tensors[0]
    ort_out = sess.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        torch_out = model.eval()(x).numpy()
    # the same Q/DQ graph: pytorch-quantization rounds x * (127 / amax), ONNX Runtime x / (amax / 127), so a value
    # on a rounding boundary may land one INT8 step apart; the logits then differ by a few 1e-4, not more
    np.testing.assert_allclose(ort_out, torch_out, atol=2e-3, rtol=0)
    assert np.mean(np.abs(ort_out - torch_out) <= 1e-4) >= 0.75
    assert not list(tmp_path.glob("*.tmp"))


def test_export_refuses_uncalibrated_and_low_opset(tmp_path):
    model = trt_qat.quantize(_classifier())
    with pytest.raises(TrtQatError, match="_input_quantizer' has no amax"):
        trt_qat.export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    with pytest.raises(TrtQatError, match="opset 11 is too old"):
        trt_qat.export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset=11)
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_nan_amax(tmp_path):
    model = trt_qat.quantize(_classifier())
    trt_qat.calibrate(model, DataLoader(_data(16), batch_size=8), method="max", progress=False)
    model[8]._input_quantizer.set_amax(torch.tensor(float("nan")))
    with pytest.raises(TrtQatError, match="'8._input_quantizer' has a NaN"):
        trt_qat.export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")


def test_calibrate_empty_data_is_refused():
    model = trt_qat.quantize(_classifier())
    with pytest.raises(TrtQatError, match="calibration set is empty"):
        trt_qat.calibrate(model, [], progress=False)
