"""The placement rules on real detectors, with no per-model configuration: the built-in detector and Ultralytics
YOLOv5nu / YOLOv8n / YOLO11n / YOLO26n built offline from their yaml, each quantized with and without a sample
input, calibrated, exported and linted: 0 scale mismatches, 0 requantize chains, 0 predicted reformat sites, and
INT8 coverage of at least 99.5% of the conv and matmul MACs once the layers left in float on purpose (each with its
reason, passed to lint as skip nodes) are set aside.

Also: the rules on the first forward when quantize() has no sample input (eval, train, no_grad, DDP, export,
save/load), quantized attention (function-output quantizers), and layers that do not run in eval going back to
float.
"""
from __future__ import annotations

import copy
import logging
import re

import numpy as np
import pytest
import torch
from torch import nn

import trt_qat
from trt_qat.config import QuantConfig
from trt_qat.errors import TrtQatError
from trt_qat.models.adapter import get_adapter
from trt_qat.onnx.lint.core import lint_onnx
from trt_qat.quant.hooks import QuantizedUpstream
from trt_qat.quant.pending import PendingRules

IMGSZ = 64
MODELS = ["builtin", "yolov5nu.yaml", "yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]


def _signature(model):
    """``[(quantizer name, class, sharing id)]``: which quantizers exist and which are one object."""
    ids, out = {}, []
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizedUpstream):
            out.append((name, "upstream", ids.setdefault(id(m.shared), len(ids))))
        elif type(m).__name__ == "TrtQuantizer":
            out.append((name, "quantizer", ids.setdefault(id(m), len(ids))))
    return out


def _build(name):
    if name == "builtin":
        adapter = get_adapter("builtin")
        model = adapter.build("yolo-n", nc=10)
    else:
        pytest.importorskip("ultralytics")
        adapter = get_adapter("ultralytics")
        model = adapter.build(name, nc=10)
    return adapter, adapter.tag(model.eval())


@pytest.fixture(scope="module", params=[(m, s) for m in MODELS for s in (True, False)],
                ids=[f"{m.split('.')[0]}-{'sample' if s else 'first-forward'}" for m in MODELS for s in (True, False)])
def linted(request, tmp_path_factory):
    name, with_sample = request.param
    torch.manual_seed(0)
    adapter, model = _build(name)
    float_layers = adapter.float_layers(model)
    sample = adapter.sample_input(IMGSZ)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("trt_qat")
    log.addHandler(handler)
    try:
        trt_qat.quantize(model, QuantConfig(skip=[re.escape(n) + "$" for n in float_layers]),
                         sample_input=sample if with_sample else None)
        g = torch.Generator().manual_seed(0)
        # percentile, not max: with max, a Concat output's amax equals one input's, which would hide unshared scales
        trt_qat.calibrate(model, [torch.rand(2, 3, IMGSZ, IMGSZ, generator=g)], method="percentile", progress=False)
    finally:
        log.removeHandler(handler)
    path = tmp_path_factory.mktemp("lint") / "model.onnx"
    trt_qat.export_onnx(model, sample, path, input_names=adapter.input_names, output_names=adapter.output_names,
                        check=False)  # (ONNX Runtime agreement is tested elsewhere; lint reads the graph)
    report = lint_onnx(path, skip_nodes=list(float_layers))
    return {"name": name, "sample": with_sample, "model": model, "float_layers": float_layers, "lint": report,
            "warnings": [r.getMessage() for r in records]}


def test_lint_is_clean(linted):
    stats = linted["lint"].stats
    assert (stats["scale_mismatches"], stats["requantize_chains"], stats["reformat_sites"]) == (0, 0, 0), \
        [(f.code, f.node) for f in linted["lint"].findings if f.reformat]
    assert stats["int8_coverage_excluding_skipped"] >= 0.995
    assert not [f for f in linted["lint"].findings if f.code == "not-int8"]


def test_float_layers_are_listed_with_reasons(linted):
    stats = linted["lint"].stats
    assert all(isinstance(why, str) and len(why) > 20 for why in linted["float_layers"].values())
    assert stats["skipped_float_layers"] == len(linted["float_layers"])
    assert all(layer["skipped"] for layer in stats["float_layers"])  # nothing float that is not on the list


def test_rules_ran_and_say_how(linted):
    model = linted["model"]
    report = model.trt_qat_rules_report
    assert report.trigger == ("sample_input" if linted["sample"] else "first forward")
    assert report.input_shape == [1, 3, IMGSZ, IMGSZ] and model.trt_qat_rules_input_shape == [1, 3, IMGSZ, IMGSZ]
    assert "placement rules applied" in trt_qat.quantizer_summary(model).splitlines()[-1]
    assert not any(isinstance(h, PendingRules) for h in model._forward_pre_hooks.values())
    # no quantizer that calibration could not reach (a branch that does not run in eval) is left to warn about
    assert not [w for w in linted["warnings"] if "saw no data" in w], linted["warnings"]


def test_attention_matmuls_are_int8(linted):
    """YOLO11's C2PSA and YOLO26's attention blocks run their MatMuls in INT8; the other models have none."""
    report = linted["model"].trt_qat_rules_report
    assert report.matmuls_quantized == {"yolo11n.yaml": 2, "yolo26n.yaml": 4}.get(linted["name"], 0)
    assert not report.matmuls_left_alone
    matmuls = [f for f in linted["lint"].findings if f.op == "MatMul"]
    assert len(matmuls) == report.matmuls_quantized and all(f.code == "int8-eligible" for f in matmuls)


def test_only_training_branches_go_back_to_float(linted):
    """YOLO26 infers end to end (the adapter selects its one-to-one head, as its deployments do): the one-to-many
    head still runs in eval but its output is unused, so its layers are float, listed with the reason; no other
    model loses a quantized layer."""
    model = linted["model"]
    left = dict(model.trt_qat_rules_report.left_float)
    if linted["name"] != "yolo26n.yaml":
        assert left == {}
        return
    assert len(left) == 24 and all(n.startswith(("model.23.cv2.", "model.23.cv3.")) for n in left)
    assert all("eval" in why for why in left.values())
    assert type(model.get_submodule("model.23.cv2.0.0.conv")) is nn.Conv2d
    assert not any(n.startswith(("model.23.cv2.", "model.23.cv3.")) for n, _ in trt_qat.iter_quantizers(model))
    assert any(".one2one_cv" in n for n, _ in trt_qat.iter_quantizers(model))  # the head that is exported: INT8
    assert {row[0] for row in model.trt_qat_skipped} >= set(left)


def test_same_placement_with_and_without_sample_input():
    """The rules on the first calibration batch place exactly what quantize(sample_input=...) places."""
    torch.manual_seed(0)
    adapter, fp32 = _build("builtin")
    a, b = copy.deepcopy(fp32), copy.deepcopy(fp32)
    trt_qat.quantize(a, sample_input=adapter.sample_input(IMGSZ))
    trt_qat.quantize(b)
    trt_qat.calibrate(b, [torch.rand(4, 3, IMGSZ, IMGSZ)], method="max", progress=False)
    assert _signature(a) == _signature(b)
    assert a.trt_qat_rules_report.output_sites == b.trt_qat_rules_report.output_sites


# ------------------------------------------------------------------------------------ rules on the first forward
class Block(nn.Module):
    """conv -> act, with a residual Add; the skip input is a module output."""

    def __init__(self, c):
        super().__init__()
        self.cv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.SiLU()
        self.cv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.cv2(self.act(self.cv1(x)))


class Attention(nn.Module):
    """A PSA-style attention block: ``qkv`` conv, ``q^T @ k``, softmax, ``v @ attn^T``, plus a depthwise ``pe``
    conv of ``v``; then two residual Adds in a row (the second's skip input is the first Add's output)."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.heads, self.kd, self.hd = heads, c // heads // 2, c // heads
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.SiLU())
        self.qkv = nn.Conv2d(c, c * 2, 1)
        self.pe = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.proj = nn.Conv2d(c, c, 1)
        self.ffn = nn.Sequential(nn.Conv2d(c, c, 1), nn.SiLU(), nn.Conv2d(c, c, 1))
        self.aux = nn.Conv2d(c, 4, 1)  # runs, but its output is unused in eval (a training-only branch)
        self.unused = nn.Conv2d(c, c, 1)  # never called

    def attn(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, self.kd * 2 + self.hd, h * w).split([self.kd, self.kd, self.hd], 2)
        a = ((q.transpose(-2, -1) @ k) * self.kd ** -0.5).softmax(dim=-1)
        return self.proj((v @ a.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w)))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.attn(x)
        x = x + self.ffn(x)
        aux = self.aux(x)
        return (x, aux) if self.training else x


def _quantized_attention(sample=True):
    torch.manual_seed(0)
    model = Attention().eval()
    trt_qat.quantize(model, sample_input=torch.zeros(1, 3, 8, 8) if sample else None)
    return model


def test_attention_is_quantized_and_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _quantized_attention()
    report = model.trt_qat_rules_report
    assert report.matmuls_quantized == 2 and report.adds_quantized == 3 and not report.adds_left_alone
    assert report.function_quantizers == 3  # softmax (matmul input), matmul (pe Add), the first Add's output
    assert dict(report.left_float) == {
        "aux": "unused in eval: it runs, but its output never reaches the model's output (a training-only branch, "
               "which the export drops)",
        "unused": "does not run in eval: the forward never calls it"}
    assert type(model.aux) is nn.Conv2d and type(model.unused) is nn.Conv2d
    assert isinstance(model.pe._input_quantizer, QuantizedUpstream)
    assert isinstance(model.ffn[0]._input_quantizer, QuantizedUpstream)
    trt_qat.calibrate(model, [torch.randn(2, 3, 8, 8) for _ in range(2)], method="max", progress=False)
    path = trt_qat.export_onnx(model, torch.zeros(1, 3, 8, 8), tmp_path / "a.onnx")
    stats = lint_onnx(path).stats
    assert (stats["scale_mismatches"], stats["requantize_chains"], stats["reformat_sites"]) == (0, 0, 0)
    assert stats["int8_layers"] == stats["weighted_layers"] == 8  # 6 convs and 2 matmuls
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    # the same function up to a flipped rounding here and there (one INT8 step of an activation, about 2% here)
    cos = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
    assert cos > 0.9999 and np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    model.train()  # training still runs (the float aux branch included) and back-propagates through the quantizers
    y, aux = model(x)
    (y.square().mean() + aux.mean()).backward()
    assert model.qkv.weight.grad is not None and model.aux.weight.grad is not None


@pytest.mark.parametrize("how", ["eval-no-grad", "train", "calibrate"])
def test_rules_run_on_the_first_forward(how):
    ref = _quantized_attention(sample=True)
    model = _quantized_attention(sample=False)
    assert "pending" in trt_qat.quantizer_summary(model)
    x = torch.randn(3, 3, 8, 8)
    if how == "eval-no-grad":
        with torch.no_grad():
            model(x)
    elif how == "train":
        model.train()
        y, _ = model(x)
        y.mean().backward()
        model.eval()
    else:
        trt_qat.calibrate(model, [x], method="max", progress=False)
        assert all(q.amax is not None for _, q in trt_qat.iter_quantizers(model) if not q._disabled)
    report = model.trt_qat_rules_report
    assert report.trigger == "first forward" and report.input_shape == [1, 3, 8, 8]
    assert _signature(model) == _signature(ref)
    assert report.output_sites == ref.trt_qat_rules_report.output_sites


def test_calibrate_log_says_whether_rules_ran(caplog):
    model = _quantized_attention(sample=False)
    with caplog.at_level(logging.INFO, logger="trt_qat"):
        trt_qat.calibrate(model, [torch.randn(2, 3, 8, 8)], method="max", progress=False)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("calibrated"))
    assert "placement rules applied (on the first forward" in line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_first_forward_under_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already up")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _quantized_attention(sample=False).train()
        ddp = DistributedDataParallel(model)
        y, aux = ddp(torch.randn(2, 3, 8, 8))
        (y.mean() + aux.mean()).backward()
        assert model.trt_qat_rules_report.trigger == "first forward"
        assert _signature(model) == _signature(_quantized_attention(sample=True))
    finally:
        dist.destroy_process_group()


def test_save_load_reproduces_the_rules(tmp_path):
    model = _quantized_attention(sample=False)
    before = trt_qat.save_quantized(model, tmp_path / "before.pt")  # saved before any forward: rules pending
    trt_qat.calibrate(model, [torch.randn(2, 3, 8, 8) for _ in range(2)], method="max", progress=False)
    trt_qat.save_quantized(model, tmp_path / "after.pt")
    loaded, _ = trt_qat.load_quantized(tmp_path / "after.pt", model=Attention())
    assert _signature(loaded) == _signature(model)
    assert loaded.trt_qat_rules_report.output_sites == model.trt_qat_rules_report.output_sites
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    early, _ = trt_qat.load_quantized(before, model=Attention())
    assert "pending" in trt_qat.quantizer_summary(early)
    trt_qat.calibrate(early, [torch.randn(2, 3, 8, 8)], method="max", progress=False)
    assert _signature(early) == _signature(model)


def test_rules_at_export_need_calibrated_quantizers(tmp_path):
    """A model that never ran a forward gets its rules at export (outside the exporter's graph); when they add
    quantizers, those have no amax, and the error says to calibrate."""
    model = _quantized_attention(sample=False)
    for _, q in trt_qat.iter_quantizers(model):
        q.set_amax(torch.tensor(1.0))
    with pytest.raises(TrtQatError, match="calibrate"):
        trt_qat.export_onnx(model, torch.zeros(1, 3, 8, 8), tmp_path / "x.onnx", check=False)
    plain = trt_qat.quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval())
    for _, q in trt_qat.iter_quantizers(plain):
        q.set_amax(torch.tensor(1.0))
    trt_qat.export_onnx(plain, torch.zeros(1, 3, 8, 8), tmp_path / "p.onnx")
    assert plain.trt_qat_rules_report.trigger == "first forward"


def test_rules_off_and_no_pending_hook():
    model = trt_qat.quantize(Block(4).eval(), QuantConfig(rules=False))
    assert not any(isinstance(h, PendingRules) for h in model._forward_pre_hooks.values())
    with torch.no_grad():
        model(torch.zeros(1, 4, 8, 8))
    assert getattr(model, "trt_qat_rules_report", None) is None
    assert "placement rules off" in trt_qat.quantizer_summary(model)


class Cat(nn.Module):
    """A stateless leaf module around torch.cat (Ultralytics' ``Concat``)."""

    def forward(self, xs):
        return torch.cat(xs, 1)


class CatModuleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.cat = Cat()
        self.c, self.d = nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.a(x)
        return self.d(self.cat([self.up(a)[..., ::2, ::2], self.b(x)])) + self.c(a)


def test_a_concat_inside_a_leaf_module_shares_one_scale():
    """A Concat module without parameters is traced through: its inputs, its output and every reader share one
    quantizer (so a percentile calibration cannot give them different scales)."""
    model = trt_qat.quantize(CatModuleNet().eval(), sample_input=torch.zeros(1, 3, 8, 8))
    assert model.trt_qat_rules_report.concats == 1
    assert model.c._input_quantizer is model.d._input_quantizer

