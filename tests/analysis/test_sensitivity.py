"""Per-layer sensitivity: ranking, restoring, shared quantizers, the forward cache, auto-skip and the CLI."""
import json
import math
import re

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

import trt_qat
from trt_qat.analysis.sensitivity import (
    SQNR_CAP_DB,
    auto_skip,
    format_table,
    layer_sensitivity,
    layers_in_float,
    list_layers,
    map_metric,
    plot_sensitivity,
    skip_patterns,
    sqnr,
    sqnr_metric,
)
from trt_qat.cli.sensitivity import main
from trt_qat.quant.quantizer import TrtQuantizer


class _Tiny(nn.Module):
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


def _hostile_model():
    torch.manual_seed(0)
    model = _Tiny().eval()
    with torch.no_grad():
        # c1's channel 0 is ~1000 everywhere: c2's per-tensor input scale becomes ~8, so its other inputs (~1) round
        # to 0. c2 ignores that channel, so the FP32 model is unaffected: only quantizing c2's input hurts.
        model.c1.weight[0].mul_(1e-3)
        model.c1.bias[0] = 1000.0
        model.c2.weight[:, 0].zero_()
    trt_qat.quantize(model)
    # a shared quantizer, as the Concat rule makes: c3a and c3b read the same tensor with one scale
    model.c3b._input_quantizer = model.c3a._input_quantizer
    trt_qat.calibrate(model, DataLoader(_images(), batch_size=8), method="max", progress=False)
    return model


def _images(n=16):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _sqnr_fn(model):
    with layers_in_float(model):
        return sqnr_metric(model, [_images(8)])


def _snapshot(model):
    return {(name, attr): (q, q.amax.clone()) for name, m in model.named_modules()
            for attr, q in m._modules.items() if isinstance(q, TrtQuantizer)}


def _assert_untouched(model, snap):
    assert _snapshot(model).keys() == snap.keys()
    for key, (q, amax) in _snapshot(model).items():
        assert q is snap[key][0], f"{key} was replaced"
        assert not q._disabled and q._if_quant, f"{key} was left disabled"
        assert torch.equal(q.amax, amax)
    assert model.c3b._input_quantizer is model.c3a._input_quantizer


def test_list_layers_and_layers_in_float_keeps_shared_quantizer():
    model = _hostile_model()
    assert list_layers(model) == ["c1", "c2", "pool", "c3a", "c3b", "c4"]
    shared = model.c3a._input_quantizer
    with layers_in_float(model, ["c3a"]):
        assert isinstance(model.c3a._input_quantizer, nn.Identity)
        assert isinstance(model.c3a._weight_quantizer, nn.Identity)
        assert model.c3b._input_quantizer is shared and not shared._disabled   # the other layer stays quantized
        assert "c3a" not in list_layers(model)
    assert model.c3a._input_quantizer is shared
    with pytest.raises(trt_qat.TrtQatError, match="not quantized layers"):
        with layers_in_float(model, ["nope"]):
            pass


def test_sqnr_values():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr(ref, ref) == SQNR_CAP_DB
    assert sqnr(ref, ref + torch.tensor([0.5, 0.0])) == pytest.approx(10 * math.log10(25 / 0.25))
    two = torch.tensor([[100.0, 1.0], [100.0, 1.0]])
    noisy = two + torch.tensor([[0.0, 0.1], [0.0, 0.1]])
    assert sqnr(two, noisy) > 50 and sqnr(two, noisy, dim=-1) == pytest.approx((SQNR_CAP_DB + 20.0) / 2)


@pytest.mark.parametrize("mode", ["leave-one-out", "only-one"])
def test_hostile_layer_ranked_first_and_model_restored(mode):
    model = _hostile_model()
    snap = _snapshot(model)
    metric = _sqnr_fn(model)
    results = layer_sensitivity(model, metric, mode, progress=False)
    assert [r["mode"] for r in results] == [mode] * 6
    assert sorted(r["layer"] for r in results) == sorted(list_layers(model))
    assert results[0]["layer"] == "c2"
    assert results[0]["delta"] > 10 + results[1]["delta"]     # by a wide margin (dB)
    assert [r["delta"] for r in results] == sorted((r["delta"] for r in results), reverse=True)
    _assert_untouched(model, snap)
    # the forward cache (reusing upstream outputs) gives exactly the same scores
    plain = layer_sensitivity(model, metric, mode, progress=False, cache_mb=0)
    assert {r["layer"]: r["score"] for r in plain} == {r["layer"]: r["score"] for r in results}
    _assert_untouched(model, snap)
    assert "forward" not in model.c2.__dict__   # the cache's wrappers are gone


def test_leave_one_out_keeps_other_layers_quantized():
    model = _hostile_model()
    shared = model.c3a._input_quantizer
    seen = {}

    def metric(m):
        floated = [n for n, mod in m.named_modules() if isinstance(getattr(mod, "_input_quantizer", None),
                                                                   nn.Identity)]
        seen[tuple(floated)] = m.c3b._input_quantizer is shared
        return 0.0

    layer_sensitivity(model, metric, "leave-one-out", layers=["c3a", "c4"], progress=False)
    assert seen == {(): True, ("c3a",): True, ("c4",): True}
    seen.clear()
    layer_sensitivity(model, metric, "only-one", layers=["c3b"], progress=False)
    assert seen == {("c1", "c2", "pool", "c3a", "c3b", "c4"): False, ("c1", "c2", "pool", "c3a", "c4"): True}


def test_both_modes_and_table_and_plot(tmp_path):
    model = _hostile_model()
    results = layer_sensitivity(model, _sqnr_fn(model), "both", progress=False)
    assert [r["mode"] for r in results] == ["leave-one-out"] * 6 + ["only-one"] * 6
    table = format_table(results, "dB")
    lines = table.splitlines()
    assert "leave-one-out Δ (dB)" in lines[0] and "only-one Δ (dB)" in lines[0]
    assert len(lines) == 2 + 6 and lines[2].startswith("| 1 | `c2` |")
    png = plot_sensitivity(results, tmp_path / "s.png", unit="dB")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_auto_skip_reaches_target_with_the_hostile_layer():
    model = _hostile_model()
    snap = _snapshot(model)
    metric = _sqnr_fn(model)
    ranking = layer_sensitivity(model, metric, "leave-one-out", progress=False)
    quantized = ranking[0]["baseline"]
    goal = (quantized + ranking[0]["score"]) / 2          # reachable by floating c2 only
    skip = auto_skip(model, metric, goal, 0.0, ranking, restore=True, progress=False)
    assert skip == ["^c2$"] and auto_skip.last["reached"] and auto_skip.last["score"] >= goal
    _assert_untouched(model, snap)
    assert metric(model) == pytest.approx(quantized)
    # applied: c2 keeps disabled copies of its quantizers; everything else (and the shared one) stays enabled
    keys = set(model.state_dict())
    skip = auto_skip(model, metric, goal, 0.0, ranking, progress=False)
    assert skip == ["^c2$"] and metric(model) >= goal
    assert model.c2._input_quantizer is not snap[("c2", "_input_quantizer")][0]
    assert model.c2._input_quantizer._disabled and model.c2._weight_quantizer._disabled
    assert not snap[("c2", "_input_quantizer")][0]._disabled
    assert list_layers(model) == ["c1", "pool", "c3a", "c3b", "c4"]
    assert set(model.state_dict()) == keys   # same keys: a checkpoint saved now loads into the same architecture
    assert all(re.fullmatch(p, "c2") for p in skip) and not re.search(skip[0], "c2x")


def test_auto_skip_greedy_order_and_already_within_target():
    model = _hostile_model()
    cost = {"c1": 1.0, "c2": 5.0, "pool": 0.5, "c3a": 2.0, "c3b": 0.1, "c4": 0.0}

    def metric(m):   # 10 minus the cost of every still-quantized layer; FP32 = 10
        return 10.0 - sum(cost[n] for n in list_layers(m))

    ranking = ["c2", "c3a", "c1", "pool", "c3b", "c4"]
    assert auto_skip(model, metric, 10.0, 1.0, ranking, restore=True, progress=False) == ["^c2$", "^c3a$", "^c1$"]
    assert auto_skip.last["score"] == pytest.approx(9.4)
    assert auto_skip(model, metric, 10.0, 9.0, ranking, restore=True, progress=False) == []
    assert skip_patterns(["a.b"]) == [r"^a\.b$"]
    with pytest.raises(trt_qat.TrtQatError, match=">= 0"):
        auto_skip(model, metric, 10.0, -1.0, ranking)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from trt_qat.data.digits_det import generate_digits_det
    from trt_qat.data.yolo import YoloDataset, build_dataloader
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


def test_cli_sqnr_with_auto_skip(calibrated, capsys):
    root, data, ckpt, n_layers = calibrated
    out = root / "out_sqnr"
    rc = main(["--checkpoint", str(ckpt), "--data", str(data), "--metric", "sqnr", "--batch-size", "4",
               "--sqnr-batches", "1", "--auto-skip", "300", "--out", str(out)])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith(f"sensitivity: {n_layers} layers (leave-one-out, sqnr)")
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["metric"] == "sqnr" and report["images"] == 4 and len(report["results"]) == n_layers
    deltas = [r["delta"] for r in report["results"]]
    assert deltas == sorted(deltas, reverse=True)
    assert report["baseline"]["fp32"] == SQNR_CAP_DB and report["baseline"]["quantized"] < SQNR_CAP_DB
    md = (out / "sensitivity.md").read_text()
    assert "![sensitivity](sensitivity.png)" in md and f"`{report['results'][0]['layer']}`" in md
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    # an unreachable SQNR: every layer ends up in the skip list, as exact-match patterns
    skip = yaml.safe_load((out / "skip.yaml").read_text())["quant"]["skip"]
    assert len(skip) == n_layers and report["auto_skip"]["reached"] is False
    assert {p[1:-1].replace("\\", "") for p in skip} == {r["layer"] for r in report["results"]}
    trt_qat.QuantConfig(skip=skip)   # valid for the QAT stage


def test_cli_map_both_modes_on_a_subset(calibrated, capsys):
    root, data, ckpt, _ = calibrated
    out = root / "out_map"
    assert main(["--checkpoint", str(ckpt), "--data", str(data), "--mode", "both", "--layers", r"^detect\.",
                 "--max-images", "4", "--batch-size", "4", "--out", str(out)]) == 0
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["metric"] == "map" and report["modes"] == ["leave-one-out", "only-one"]
    assert sorted({r["layer"] for r in report["results"]}) == ["detect.m.0", "detect.m.1", "detect.m.2"]
    assert len(report["results"]) == 6 and all(0.0 <= r["score"] <= 1.0 for r in report["results"])
    assert "only-one Δ (mAP50-95)" in (out / "sensitivity.md").read_text()
    assert not (out / "skip.yaml").exists()


def test_map_metric_matches_evaluate(calibrated):
    from trt_qat.data.yolo import YoloDataset
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.runners.torch_runner import TorchRunner

    _, data, ckpt, _ = calibrated
    model, _ = trt_qat.load_quantized(ckpt)
    ds = YoloDataset(data, "val")
    fn = map_metric(ds, batch_size=4, max_images=4)
    assert fn(model) == evaluate(TorchRunner(model), ds, batch_size=4, max_images=4)["map50_95"]


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "data.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.pt" in err and "does not exist" in err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
