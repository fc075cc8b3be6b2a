"""trt_qat.models.reshape: a pruned model rebuilt from its unpruned architecture plus its layer shapes, through every
load path (FP32 checkpoint, quantized checkpoint), and refused one line at a time where it cannot be."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trt_qat.errors import TrtQatError
from trt_qat.models.adapter import get_adapter, load_fp32
from trt_qat.models.reshape import PRUNED_KEY, check_not_pruned, layer_shapes, reshape_modules


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.up(self.dw(self.bn(self.conv(x))))
        return self.fc(y.mean((2, 3)))


def test_reshape_conv_bn_depthwise_transposed_linear():
    model = Net()
    shapes = {"conv": [8, 3, 3, 3], "bn": [8], "dw": [8, 1, 3, 3], "up": [8, 4, 2, 2], "fc": [4, 4]}
    reshape_modules(model, shapes)
    assert model.conv.out_channels == 8 and model.conv.bias.shape == (8,)
    assert model.bn.num_features == 8 and model.bn.running_var.tolist() == [1.0] * 8
    assert model.dw.groups == 8 and model.dw.in_channels == 8
    assert model.up.in_channels == 8 and model.up.out_channels == 4 and model.up.bias.shape == (4,)
    assert model.fc.in_features == 4
    assert model(torch.zeros(1, 3, 4, 4)).shape == (1, 4)
    assert {k: v for k, v in layer_shapes(model).items() if k in shapes} == shapes
    with pytest.raises(TrtQatError, match="lists pruned layer 'nope'"):
        reshape_modules(Net(), {"nope": [1, 1, 1, 1]})


def test_unpruned_architecture_refuses_a_pruned_state_dict():
    small = reshape_modules(Net(), {"conv": [8, 3, 3, 3], "bn": [8], "dw": [8, 1, 3, 3], "up": [8, 4, 2, 2]})
    with pytest.raises(TrtQatError, match="holds a pruned model .*'conv' has weight \\[8, 3, 3, 3\\]"):
        check_not_pruned(Net(), small.state_dict(), "x.pt")
    check_not_pruned(Net(), Net().state_dict())  # same shapes: fine


def test_builtin_save_and_load_carry_the_shapes(tmp_path):
    adapter = get_adapter("builtin")
    model = adapter.tag(adapter.build("yolo-n", nc=3).eval())
    assert PRUNED_KEY not in adapter.architecture(model)  # unpruned models are described as before
    shapes = {"stem.conv": [8, 3, 6, 6], "stem.bn": [8], "down1.conv": [32, 8, 3, 3]}
    reshape_modules(model, shapes)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1)
    path = adapter.save(model, tmp_path / "p.pt")
    loaded, _ = load_fp32(path)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    assert adapter.architecture(loaded)[PRUNED_KEY]["stem.conv"] == [8, 3, 6, 6]
    rebuilt = adapter.from_architecture(adapter.architecture(loaded))
    assert rebuilt.stem.conv.out_channels == 8
