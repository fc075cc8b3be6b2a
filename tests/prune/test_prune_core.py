"""trt_qat.prune.core: targets, rounding, kept layers, the head left whole, and the one-line refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trt_qat.errors import TrtQatError
from trt_qat.models.adapter import get_adapter
from trt_qat.prune.core import (
    check_target,
    count_macs_params,
    head_output_layers,
    match_keep,
    prune,
    require_torch_pruning,
)

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def pruned60():
    adapter = get_adapter("builtin")
    torch.manual_seed(0)
    model = adapter.tag(adapter.build("yolo-n", nc=10).eval())
    x = adapter.sample_input(32)
    base = count_macs_params(model, x)
    report = prune(model, x, target_macs=0.6, keep=[r"^stage1\.cv1\.conv$"])
    return model, report, base, x


def test_prune_reaches_the_target_with_multiples_of_8(pruned60):
    model, report, (macs0, params0), x = pruned60
    macs, params = count_macs_params(model, x)
    assert macs <= 0.6 * macs0 and macs > 0.4 * macs0
    assert report["macs"] == [macs0, macs] and report["params"][1] == params < params0
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, conv in convs.items():
        if name.startswith("detect."):
            continue
        assert conv.out_channels % 8 == 0, (name, conv.out_channels)
    # the head's outputs and the kept layer stay whole
    assert [convs[f"detect.m.{i}"].out_channels for i in range(3)] == [45, 45, 45]
    assert convs["stage1.cv1.conv"].out_channels == 16
    assert {"detect.m.0", "detect.m.1", "detect.m.2", "stage1.cv1.conv"} <= set(report["kept"])
    assert report["pruned_layers"]["stem.conv"][1] < report["pruned_layers"]["stem.conv"][0]
    model.eval()
    out = model(x)
    assert out.shape[0] == 1 and out.shape[-1] == 15


def test_target_params_and_bn_scale():
    adapter = get_adapter("builtin")
    model = adapter.build("yolo-n", nc=10).eval()
    x = adapter.sample_input(32)
    report = prune(model, x, target_params=0.7, importance="bn_scale", round_to=16, steps=30)
    assert report["params_ratio"] <= 0.7
    assert all(m.out_channels % 16 == 0 for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and not n.startswith("detect."))


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), "x"])
def test_target_outside_unit_interval(value):
    with pytest.raises(TrtQatError, match=r"outside \(0, 1\]|not a number") as exc:
        check_target(value, "--target-macs")
    assert "\n" not in str(exc.value)
    assert check_target(1, "--target-macs") == 1.0 and check_target(None, "--target-macs") is None


def test_keep_matching_nothing_and_bad_regex():
    model = get_adapter("builtin").build("yolo-n", nc=10)
    with pytest.raises(TrtQatError, match="--keep 'nothing_here' matches no conv"):
        match_keep(model, ["nothing_here"])
    with pytest.raises(TrtQatError, match="not a valid regex"):
        match_keep(model, ["("])
    assert match_keep(model, [r"^stem\."]) == ["stem.conv"]


def test_no_target_and_unknown_importance():
    model = get_adapter("builtin").build("yolo-n", nc=10).eval()
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(TrtQatError, match="no pruning target"):
        prune(model, x)
    with pytest.raises(TrtQatError, match="unknown importance"):
        prune(model, x, target_macs=0.5, importance="taylor")


class _Hardcoded(nn.Module):
    """A forward that hard-codes a channel count: pruning conv ``a`` breaks layer ``b``'s view."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 1)
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = self.a(x)
        y = y.reshape(y.shape[0], 32, y.shape[2] * y.shape[3]).reshape(y.shape)
        return self.head(self.b(y))


class _Functional(nn.Module):
    """A conv whose weight is used outside its module call: Torch-Pruning cannot see it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.hidden = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.nn.functional.conv2d(self.a(x), self.hidden.weight, self.hidden.bias)
        return self.head(y)


def test_a_model_torch_pruning_cannot_trace_names_the_layer():
    with pytest.raises(TrtQatError, match="layer 'hidden'") as exc:
        prune(_Functional().eval(), torch.zeros(1, 3, 16, 16), target_macs=0.5)
    assert "\n" not in str(exc.value)
    with pytest.raises(TrtQatError, match="fails in or right after layer 'a'") as exc:
        prune(_Hardcoded().eval(), torch.zeros(1, 3, 16, 16), target_macs=0.5)
    assert "--keep" in str(exc.value)


def test_head_outputs_found_from_the_graph():
    import torch_pruning as tp

    model = get_adapter("builtin").build("yolo-n", nc=3).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
    assert head_output_layers(model, graph) == ["detect.m.0", "detect.m.1", "detect.m.2"]


def test_missing_torch_pruning_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if not installed
    with pytest.raises(TrtQatError, match=r"pip install trt-qat\[prune\]") as exc:
        require_torch_pruning()
    assert "\n" not in str(exc.value)
