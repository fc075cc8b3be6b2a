"""trt_qat.prune.sparsity: the 2:4 mask, the eligibility rule, the after-step hook, and the pattern surviving QAT and
Q/DQ export (a quantized zero stays zero)."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from trt_qat.errors import TrtQatError
from trt_qat.onnx.lint import lint_onnx
from trt_qat.prune.sparsity import (
    SparsityMasks,
    eligible_convs,
    holds_2_4,
    mask_2_4,
    sparsify,
    sparsity_hook,
    sparsity_rule,
    sparsity_stats,
)


class Net(nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 1), nn.ReLU())
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.head = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        return self.head(self.dw(self.body(self.stem(x))))


def test_mask_keeps_the_two_largest_of_every_four_input_channels():
    w = torch.tensor([1.0, -4.0, 3.0, 0.5, 0.1, 0.2, -0.3, 0.05]).view(1, 8, 1, 1)
    mask = mask_2_4(w)
    assert mask.view(-1).tolist() == [False, True, True, False, False, True, True, False]
    w = torch.randn(16, 32, 3, 3)
    m = mask_2_4(w)
    assert m.shape == w.shape and int(m.sum()) == w.numel() // 2
    grouped = m.movedim(1, -1).reshape(16, 3, 3, 8, 4).sum(-1)
    assert bool((grouped == 2).all())  # per output channel and kernel position
    assert holds_2_4(w * m) and not holds_2_4(w)
    with pytest.raises(TrtQatError, match="multiple of 4"):
        mask_2_4(torch.randn(4, 3, 1, 1))


def test_rule_skips_small_grouped_and_odd_convs(capsys):
    model = Net(64)
    eligible, skipped = eligible_convs(model, 64)
    assert eligible == ["body.0", "body.3"]
    assert "not a multiple of 4" in skipped["stem"] and "grouped" in skipped["dw"] and "below 64" in skipped["head"]
    result = sparsify(model, 64)
    printed = capsys.readouterr().out
    assert sparsity_rule(64) in printed and "2 of 5 convs sparsified" in printed
    assert set(result["masks"]) == {"body.0", "body.3"}
    assert holds_2_4(model.body[0].weight) and not holds_2_4(model.stem.weight)
    stats = sparsity_stats(model, torch.zeros(1, 3, 8, 8), 64)
    assert stats["eligible"] == stats["sparse"] == 2 and stats["sparse_fraction_of_eligible"] == 1.0


def test_no_eligible_layer_is_one_line():
    with pytest.raises(TrtQatError, match="no conv is eligible for 2:4") as exc:
        sparsify(Net(32), 256)
    assert "\n" not in str(exc.value) and "--min-channels" in str(exc.value)


def test_hook_reapplies_the_masks_after_each_step():
    model = Net(64)
    sparsify(model, 64, verbose=False)
    hook = sparsity_hook(model, 64)
    assert isinstance(hook, SparsityMasks) and set(hook.masks) == {"body.0", "body.3"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert not holds_2_4(model.body[0].weight)  # a plain step fills the zeros in
    hook.after_step(type("Loop", (), {"model": model})())
    assert holds_2_4(model.body[0].weight) and holds_2_4(model.body[3].weight)
    assert sparsity_hook(Net(64), 64) is None  # a dense model has no masks to keep


def test_qat_and_qdq_export_keep_the_pattern(tmp_path):
    import trt_qat
    from trt_qat.train.qat import finetune

    torch.manual_seed(0)
    model = Net(64).eval()
    sparsify(model, 64, verbose=False)
    x = torch.randn(2, 3, 8, 8)
    trt_qat.quantize(model, trt_qat.QuantConfig(), sample_input=x[:1])
    trt_qat.calibrate(model, [x], method="max", num_batches=1)
    hook = sparsity_hook(model, 64)  # the quantized convs keep their names and weights
    assert set(hook.masks) == {"body.0", "body.3"}
    finetune(model, [(x,), (x,)], loss_fn=lambda m, b: m(b[0]).square().mean(), epochs=1, lr=0.05,
             extra_hooks=[hook], progress=False)
    assert holds_2_4(model.body[0].weight) and holds_2_4(model.body[3].weight)
    path = tmp_path / "sparse_qdq.onnx"
    trt_qat.export_onnx(model.eval(), x[:1], str(path), opset=13)
    # the exported weights, quantized by their own per-channel scales, still hold 2:4
    report = lint_onnx(str(path), sparsity_min_channels=64)
    sp = report.stats["sparsity"]
    assert sp["large_enough"] == 2 and sp["ready"] == 2 and sp["ready_fraction_of_eligible"] == pytest.approx(1.0)
    assert sp["ready_fraction"] > 0.5
    assert "2:4-ready 2/" in report.summary()
    qs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert qs  # a Q/DQ graph
