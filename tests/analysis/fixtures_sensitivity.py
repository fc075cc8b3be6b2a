"""A tiny quantized model with one hostile layer and a shared quantizer, shared by the analysis tests.

``from fixtures_sensitivity import ...`` works because pytest puts this directory on ``sys.path`` (no
``__init__.py`` here, the default import mode), as for ``tests/fixtures_onnx.py``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

import trt_qat
from trt_qat.analysis.metrics import sqnr_metric
from trt_qat.analysis.toggle import layers_in_float
from trt_qat.quant.quantizer import TrtQuantizer


class TinyNet(nn.Module):
    """c1 -> c2 -> maxpool -> (c3a | c3b) -> cat -> c4; c2's input carries a huge outlier channel."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c3a = nn.Conv2d(8, 8, 1)
        self.c3b = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.pool(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.c4(torch.cat([self.c3a(x), self.c3b(x)], 1))


def hostile_model():
    """A calibrated quantized :class:`TinyNet` where only quantizing c2's input hurts, and c3a/c3b share one
    input quantizer."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        # c1's channel 0 is ~1000 everywhere: c2's per-tensor input scale becomes ~8, so its other inputs (~1) round
        # to 0. c2 ignores that channel, so the FP32 model is unaffected: only quantizing c2's input hurts.
        model.c1.weight[0].mul_(1e-3)
        model.c1.bias[0] = 1000.0
        model.c2.weight[:, 0].zero_()
    trt_qat.quantize(model)
    # a shared quantizer, as the Concat rule makes: c3a and c3b read the same tensor with one scale
    model.c3b._input_quantizer = model.c3a._input_quantizer
    trt_qat.calibrate(model, DataLoader(images(), batch_size=8), method="max", progress=False)
    return model


def images(n=16):
    """``n`` fixed random 3x16x16 images."""
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def sqnr_fn(model):
    """The SQNR metric of ``model`` against itself with every quantizer bypassed."""
    with layers_in_float(model):
        return sqnr_metric(model, [images(8)])


def snapshot(model):
    """``{(module name, attribute): (quantizer, amax copy)}`` of every quantizer a module holds."""
    return {(name, attr): (q, q.amax.clone()) for name, m in model.named_modules()
            for attr, q in m._modules.items() if isinstance(q, TrtQuantizer)}


def assert_untouched(model, snap):
    """The same quantizer objects, enabled, with the same amax, and c3a/c3b still sharing one."""
    assert snapshot(model).keys() == snap.keys()
    for key, (q, amax) in snapshot(model).items():
        assert q is snap[key][0], f"{key} was replaced"
        assert not q._disabled and q._if_quant, f"{key} was left disabled"
        assert torch.equal(q.amax, amax)
    assert model.c3b._input_quantizer is model.c3a._input_quantizer
