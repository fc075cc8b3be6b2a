"""trt_qat.prune.slimming: L1 on BatchNorm gammas as a proximal after-step hook."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trt_qat.errors import TrtQatError
from trt_qat.prune.slimming import BNL1, bn_gamma_stats
from trt_qat.train.loop import build_optimizer, fit


def test_soft_threshold_drives_small_gammas_to_exact_zero():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.001, -0.002, 0.5, -0.5, 1.0, 0.003, 2.0, -0.004]))
    opt = build_optimizer(model, "sgd", 0.1)
    loop = type("Loop", (), {"model": model, "optimizer": opt})()
    for g in opt.param_groups:
        g["lr"] = 0.1
    BNL1(0.05, skip=[r"^3$"]).after_step(loop)  # threshold 0.1 * 0.05 = 0.005
    g = model[1].weight.detach()
    assert (g[[0, 1, 5, 7]] == 0).all() and g[2].item() == pytest.approx(0.495) and g[3].item() == pytest.approx(-0.495)
    assert torch.equal(model[3].weight.detach(), torch.ones(2))  # skipped
    assert bn_gamma_stats(model)["below"] == 4
    with pytest.raises(TrtQatError, match="must be > 0"):
        BNL1(0)


def test_hook_runs_in_the_training_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    data = [(torch.randn(4, 3, 4, 4),)] * 3
    opt = build_optimizer(model, "sgd", 0.1)
    before = model[1].weight.detach().abs().sum()
    fit(model, data, lambda m, b: m(b[0]).square().mean() * 0, opt, epochs=1, lr_at=lambda s, t, g: 0.1,
        hooks=[BNL1(1.0)], progress=False)
    assert model[1].weight.detach().abs().sum() < before - 0.2
