"""Tests for trt_qat.quant.rules: graph-derived scale sharing and quantized residual Adds, checked on the exported ONNX.

Every model is calibrated on random data, exported with ``trt_qat.export_onnx`` and inspected node by node: the
scales of the QuantizeLinear/DequantizeLinear pairs around Concat, MaxPool, Resize and Add are read from the
ONNX initializers and Constant nodes.
"""
from __future__ import annotations

import copy
import pickle
from collections import defaultdict

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import trt_qat
from trt_qat.config import QuantConfig
from trt_qat.errors import TrtQatError
from trt_qat.quant.hooks import QuantizedUpstream
from trt_qat.quant.rules import RulesReport, apply_rules

PASS_THROUGH = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split", "Pad",
                "Gather", "Expand"}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------- ONNX helpers
class QdqGraph:
    """Producer/consumer maps and Q/DQ scales of an exported ONNX model."""

    def __init__(self, path):
        self.model = onnx.load(str(path))
        g = self.model.graph
        self.nodes = list(g.node)
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        for n in self.nodes:  # the exporter deduplicates equal constants behind Identity nodes
            if n.op_type == "Identity" and n.input[0] in self.consts:
                self.consts[n.output[0]] = self.consts[n.input[0]]
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)

    def ops(self, op_type):
        return [n for n in self.nodes if n.op_type == op_type]

    def scale(self, qdq_node) -> float:
        value = self.consts[qdq_node.input[1]]
        assert value.size == 1, "activation scales must be per-tensor"
        return float(value.reshape(-1)[0])

    def dq_producer(self, tensor):
        """The DequantizeLinear producing ``tensor`` (through data-movement ops), else None."""
        for _ in range(16):
            n = self.producer.get(tensor)
            if n is None:
                return None
            if n.op_type == "DequantizeLinear":
                return n
            if n.op_type not in PASS_THROUGH:
                return None
            tensor = n.input[0]
        return None

    def q_consumers(self, tensor):
        out = []
        for n in self.consumers.get(tensor, []):
            if n.op_type == "QuantizeLinear":
                out.append(n)
            elif n.op_type in PASS_THROUGH and n.input[0] == tensor:
                for o in n.output:
                    out += self.q_consumers(o)
        return out

    def scales_of(self, tensor):
        scales = [self.scale(q) for q in self.q_consumers(tensor)]
        dq = self.dq_producer(tensor)
        if dq is not None:
            scales.append(self.scale(dq))
        return scales

    def scales_around(self, node):
        """Every Q/DQ scale on the activation inputs and outputs of ``node``."""
        scales = []
        for t in list(node.input) + list(node.output):
            if t and t not in self.consts:
                scales += self.scales_of(t)
        return scales

    def activation_q_count(self):
        """QuantizeLinear nodes quantizing activations (not constant weights)."""
        return sum(1 for q in self.ops("QuantizeLinear") if q.input[0] not in self.consts)


def _distinct(scales, rtol=1e-6):
    reps = []
    for s in scales:
        if not any(abs(s - r) <= rtol * max(abs(r), 1e-30) for r in reps):
            reps.append(s)
    return reps


def _calibrate(model, shape, method="max", seed=0):
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(*shape, generator=g) for _ in range(2)]
    # the 99th percentile (not 99.99, ~the max on so little data) makes distributions that share a max differ
    trt_qat.calibrate(model, data, method=method, percentile=99.0, progress=False)
    return model


def _export(model, shape, path):
    return QdqGraph(trt_qat.export_onnx(model, torch.zeros(1, *shape[1:]), path))


def _ort_vs_torch(model, onnx_path, x):
    import onnxruntime as ort

    model.eval()
    with torch.no_grad():
        ref = model(x).detach().numpy().reshape(-1).astype(np.float64)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].reshape(-1).astype(np.float64)
    return float(ref @ out / (np.linalg.norm(ref) * np.linalg.norm(out) + 1e-12))


# --------------------------------------------------------------------------------------------- tiny models
class ConvBNAct(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class CatFanOut(nn.Module):
    """Two conv branches of one tensor (fan-out), concatenated; branch ``a`` is also read by another conv."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3)
        self.a = ConvBNAct(16, 16)
        self.b = ConvBNAct(16, 16, 3)
        self.side = nn.Conv2d(16, 8, 1)
        self.fuse = nn.Conv2d(32, 8, 1)
        with torch.no_grad():
            self.b.bn.weight.mul_(6.0)  # branch b has a much wider range than branch a

    def forward(self, x):
        h = self.stem(x)
        a = self.a(h)
        y = torch.cat((a, self.b(h)), 1)
        return self.fuse(y) * self.side(a)


class SPPFLike(nn.Module):
    """SPPF with three distinct MaxPool modules, then Concat."""

    def __init__(self):
        super().__init__()
        self.cv1 = ConvBNAct(3, 8, 3)
        self.m1 = nn.MaxPool2d(5, 1, 2)
        self.m2 = nn.MaxPool2d(5, 1, 2)
        self.m3 = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBNAct(32, 8)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m1(x)
        y2 = self.m2(y1)
        y3 = self.m3(y2)
        return self.cv2(torch.cat((x, y1, y2, y3), 1))


class UpCat(nn.Module):
    """FPN-like: a lateral conv, nearest upsample, Concat with a finer map."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3)
        self.down = ConvBNAct(8, 16, 3, 2)
        self.lat = ConvBNAct(16, 8)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.side = nn.Conv2d(8, 4, 1)
        self.fuse = ConvBNAct(16, 8, 3)

    def forward(self, x):
        p3 = self.stem(x)
        lat = self.lat(self.down(p3))
        y = torch.cat((self.up(lat), p3), 1)
        return self.fuse(y).mean((2, 3)) * self.side(lat).mean((2, 3)).repeat(1, 2)


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1 = ConvBNAct(c, c)
        self.cv2 = ConvBNAct(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class BottleneckNet(nn.Module):
    def __init__(self, n=1):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3)
        self.m = nn.Sequential(*(Bottleneck(16) for _ in range(n)))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.m(self.stem(x)))


class FunctionalSkip(nn.Module):
    """The skip tensor comes from F.relu in the top-level forward and is read before any module returns it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.nn.functional.relu(self.stem(x))
        return h + self.c2(torch.relu(self.c1(h)))


class SharedAct(nn.Module):
    """One activation module called twice; only its second output is a residual skip."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.c0(x))
        g = self.act(self.c1(h))
        return g + self.c3(self.c2(g))


def _quantized(model, shape, rules=True):
    torch.manual_seed(0)
    model = model.eval()
    trt_qat.quantize(model, QuantConfig(rules=rules), sample_input=torch.zeros(1, *shape[1:]))
    return model


# ------------------------------------------------------------------------------------------------- tests
def test_concat_and_fanout_share_one_scale(tmp_path):
    torch.manual_seed(0)
    model = _quantized(CatFanOut(), (2, 3, 16, 16))
    report = model.trt_qat_rules_report
    assert isinstance(report, RulesReport) and report.concats == 1 and report.groups_merged >= 1
    # fan-out: both branch convs read h through one quantizer; Concat: fuse and side share a's quantizer
    assert model.a.conv._input_quantizer is model.b.conv._input_quantizer
    assert model.fuse._input_quantizer is model.side._input_quantizer
    assert "format" in dir(report) and "concat" in report.format()
    _calibrate(model, (2, 3, 16, 16))
    g = _export(model, (2, 3, 16, 16), tmp_path / "cat.onnx")
    (cat,) = g.ops("Concat")
    scales = g.scales_around(cat)
    assert len(scales) >= 2 and len(_distinct(scales)) == 1, scales
    # no tensor is quantized twice: the fan-out tensor h has one Q node, whose DQ feeds both branch convs
    for tensor, readers in g.consumers.items():
        assert sum(n.op_type == "QuantizeLinear" and n.input[0] == tensor for n in readers) <= 1, tensor
    assert g.activation_q_count() == 4  # the image, h, branch a (for side) and the Concat output (same scale)


def test_sppf_maxpool_chain_shares_one_scale(tmp_path):
    model = _quantized(SPPFLike(), (2, 3, 16, 16))
    report = model.trt_qat_rules_report
    assert report.maxpools == 3 and report.concats == 1
    q = model.m1._input_quantizer
    assert model.m2._input_quantizer is q and model.m3._input_quantizer is q and model.cv2.conv._input_quantizer is q
    _calibrate(model, (2, 3, 16, 16), method="percentile")
    g = _export(model, (2, 3, 16, 16), tmp_path / "sppf.onnx")
    scales = []
    for node in g.ops("MaxPool") + g.ops("Concat"):
        around = g.scales_around(node)
        assert around, node.name
        scales += around
    assert len(_distinct(scales)) == 1, scales


def test_upsample_nearest_and_concat_share_one_scale(tmp_path):
    model = _quantized(UpCat(), (2, 3, 16, 16))
    report = model.trt_qat_rules_report
    assert report.resizes == 1 and report.concats == 1
    _calibrate(model, (2, 3, 16, 16), method="percentile")
    g = _export(model, (2, 3, 16, 16), tmp_path / "up.onnx")
    (resize,) = g.ops("Resize") or g.ops("Upsample")
    (cat,) = g.ops("Concat")
    scales = g.scales_around(resize) + g.scales_around(cat)
    assert len(scales) >= 3 and len(_distinct(scales)) == 1, scales


@pytest.mark.parametrize("rules", [False, True])
def test_naive_placement_has_mismatches_that_rules_remove(tmp_path, rules):
    """Without the rules, Concat and MaxPool see different scales (a requantize in TensorRT); with them, none."""
    mismatches = 0
    for i, (cls, shape) in enumerate([(SPPFLike, (2, 3, 16, 16)), (CatFanOut, (2, 3, 16, 16)),
                                      (UpCat, (2, 3, 16, 16))]):
        model = _quantized(cls(), shape, rules=rules)
        _calibrate(model, shape, method="percentile")
        g = _export(model, shape, tmp_path / f"m{i}.onnx")
        for node in g.ops("Concat") + g.ops("MaxPool") + g.ops("Resize"):
            mismatches += len(_distinct(g.scales_around(node))) > 1
    if rules:
        assert mismatches == 0
    else:
        assert mismatches >= 3  # at least the SPPF pools and the Concats


def _skip_inputs(g, add):
    """For an ONNX Add: which of its two inputs arrive through DequantizeLinear."""
    return [g.dq_producer(t) for t in add.input]


def test_bottleneck_skip_quantized_once_and_shared_with_cv1(tmp_path):
    model = _quantized(BottleneckNet(), (2, 3, 16, 16))
    report = model.trt_qat_rules_report
    assert report.adds_quantized == 1 and report.output_quantizers == 1 and report.inputs_folded == 1
    assert not report.adds_left_alone
    block = model.m[0]
    # cv1 reads the skip tensor, which is now quantized upstream (at stem.act) by the same quantizer
    assert isinstance(block.cv1.conv._input_quantizer, QuantizedUpstream)
    shared = block.cv1.conv._input_quantizer.shared
    assert model.stem.act._trt_qat_output_quantizers["0"] is shared
    assert sum(q is shared for _, q in trt_qat.iter_quantizers(model)) == 1  # calibrated once
    _calibrate(model, (2, 3, 16, 16))
    assert float(block.cv1.conv._input_quantizer.amax) == float(shared.amax) > 0
    path = tmp_path / "bottleneck.onnx"
    g = _export(model, (2, 3, 16, 16), path)
    (add,) = g.ops("Add")
    dqs = _skip_inputs(g, add)
    assert sum(d is not None for d in dqs) == 1, "exactly one Add input (the skip) arrives through DQ"
    skip_dq = next(d for d in dqs if d is not None)
    conv_input = next(t for t in add.input if g.dq_producer(t) is None)
    assert not g.q_consumers(conv_input), "the conv branch output must not be quantized"
    # one Q/DQ on the skip tensor, feeding both the Add and cv1's conv
    skip_q = g.producer[skip_dq.input[0]]
    assert skip_q.op_type == "QuantizeLinear" and len(g.q_consumers(skip_q.input[0])) == 1
    readers = {n.op_type for n in g.consumers[skip_dq.output[0]]}
    assert readers == {"Add", "Conv"}
    assert _ort_vs_torch(model, path, torch.randn(2, 3, 16, 16)) > 0.999


def test_bottleneck_chain_quantizes_functional_add_outputs_at_the_block():
    """The skip of the second block is the first block's Add output: it is quantized where block 0 returns it."""
    model = _quantized(BottleneckNet(n=3), (1, 3, 16, 16))
    report = model.trt_qat_rules_report
    assert report.adds_quantized == 3 and not report.adds_left_alone
    assert report.output_sites == ["stem.act[0]", "m.0[0]", "m.1[0]"]


def test_quant_skip_matches_the_skip_input_quantizers_sensitivity_reports():
    """sensitivity names a residual Add's skip-input quantizer '<producer>._trt_qat_output_quantizers'; the
    pattern auto-skip writes for that name keeps that Add in float, and nothing else."""
    from trt_qat.analysis.sensitivity import skip_patterns
    from trt_qat.analysis.toggle import list_layers

    layer = "m.0._trt_qat_output_quantizers"
    assert layer in list_layers(_quantized(BottleneckNet(n=3), (1, 3, 16, 16)))
    torch.manual_seed(0)
    model = BottleneckNet(n=3).eval()
    trt_qat.quantize(model, QuantConfig(skip=skip_patterns([layer])), sample_input=torch.zeros(1, 3, 16, 16))
    report = model.trt_qat_rules_report
    assert report.output_sites == ["stem.act[0]", "m.1[0]"] and report.adds_quantized == 2
    (where, reason), = report.adds_left_alone
    assert "quant.skip" in reason and layer in reason
    assert layer not in list_layers(model) and "m.0.cv1.conv" in list_layers(model)
    # a pattern that does not name the output quantizers leaves the Adds as they were (saved skip lists still load)
    torch.manual_seed(0)
    model = BottleneckNet(n=3).eval()
    trt_qat.quantize(model, QuantConfig(skip=["act"]), sample_input=torch.zeros(1, 3, 16, 16))
    assert model.trt_qat_rules_report.adds_quantized == 3


def test_functional_skip_is_quantized_at_the_function(tmp_path):
    """A skip input no module returns (F.relu in the model's own forward) is quantized at that call: the Add gets
    one quantized input in the ONNX, and PyTorch and ONNX Runtime agree."""
    torch.manual_seed(0)
    model = _quantized(FunctionalSkip(), (1, 3, 16, 16))
    report = model.trt_qat_rules_report
    assert report.adds_quantized == 1 and not report.adds_left_alone and report.function_quantizers == 1
    assert report.output_sites == ["<model>[0].relu#0"]
    assert "_trt_qat_output_quantizers_fn.0_relu_0" in dict(trt_qat.iter_quantizers(model))
    assert isinstance(model.c1._input_quantizer, QuantizedUpstream)  # (c1 reads the same tensor)
    _calibrate(model, (2, 3, 16, 16))
    g = _export(model, (2, 3, 16, 16), tmp_path / "f.onnx")
    adds, bad = _residual_adds_through_dq(g)
    assert len(adds) == 1 and not bad
    assert _ort_vs_torch(model, tmp_path / "f.onnx", torch.randn(2, 3, 16, 16)) > 0.999


def test_functional_skip_left_alone_when_skipped():
    from trt_qat.analysis.sensitivity import skip_patterns

    torch.manual_seed(0)
    model = FunctionalSkip().eval()
    trt_qat.quantize(model, QuantConfig(skip=skip_patterns(["_trt_qat_output_quantizers_fn"])),
                     sample_input=torch.zeros(1, 3, 16, 16))
    report = model.trt_qat_rules_report
    assert report.adds_quantized == 0 and len(report.adds_left_alone) == 1
    where, reason = report.adds_left_alone[0]
    assert "quant.skip" in reason
    assert "left alone" in report.format()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 8, 16, 16)


def test_module_called_twice_honours_call_index(tmp_path):
    model = _quantized(SharedAct(), (1, 3, 16, 16))
    assert list(model.act._trt_qat_output_quantizers.keys()) == ["1"]
    _calibrate(model, (2, 3, 16, 16))
    path = tmp_path / "shared_act.onnx"
    g = _export(model, (2, 3, 16, 16), path)
    relus = g.ops("Relu")
    assert len(relus) == 2
    # call 0 (h): only c1's input Q; call 1 (g): the output quantizer, whose DQ feeds both c2 and the Add
    for relu, readers in zip(relus, ({"Conv"}, {"Conv", "Add"})):
        (q,) = g.q_consumers(relu.output[0])
        (dq,) = g.consumers[q.output[0]]
        assert {n.op_type for n in g.consumers[dq.output[0]]} == readers
    (add,) = g.ops("Add")
    assert sum(d is not None for d in _skip_inputs(g, add)) == 1
    x = torch.randn(2, 3, 16, 16)
    assert _ort_vs_torch(model, path, x) > 0.999
    # calling forward() directly (no root pre-hook) keeps the call index aligned
    with torch.no_grad():
        model.eval()
        ref = model(x)
        assert torch.equal(model.forward(x), ref) and torch.equal(model.forward(x), ref)


def test_rules_survive_deepcopy_pickle_and_training_backward():
    model = _quantized(BottleneckNet(n=2), (1, 3, 16, 16))
    _calibrate(model, (2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.eval()
        with torch.no_grad():
            assert torch.equal(clone(x), ref)
        up = clone.m[0].cv1.conv._input_quantizer
        assert up.shared is clone.stem.act._trt_qat_output_quantizers["0"]
        assert up.shared is not model.stem.act._trt_qat_output_quantizers["0"]
    model.train()
    model(x).square().mean().backward()
    assert model.stem.conv.weight.grad is not None and model.stem.conv.weight.grad.abs().sum() > 0


def test_save_load_roundtrip_is_deterministic(tmp_path):
    torch.manual_seed(3)
    fp32 = CatFanOut()
    fresh = copy.deepcopy(fp32)
    model = _quantized(copy.deepcopy(fp32), (1, 3, 16, 16))
    _calibrate(model, (2, 3, 16, 16))
    assert model.trt_qat_rules_input_shape == [1, 3, 16, 16]
    ckpt = trt_qat.save_quantized(model, tmp_path / "q.pt")
    loaded, _ = trt_qat.load_quantized(ckpt, model=fresh)
    loaded.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.a.conv._input_quantizer is loaded.b.conv._input_quantizer
    assert [n for n, _ in trt_qat.iter_quantizers(loaded)] == [n for n, _ in trt_qat.iter_quantizers(model)]


def test_apply_rules_is_idempotent_and_checks_input():
    model = _quantized(BottleneckNet(), (1, 3, 16, 16))
    before = [n for n, _ in trt_qat.iter_quantizers(model)]
    report = apply_rules(model, torch.zeros(1, 3, 16, 16))
    assert report is model.trt_qat_rules_report
    assert [n for n, _ in trt_qat.iter_quantizers(model)] == before
    with pytest.raises(TrtQatError, match="sample input"):
        apply_rules(_quantized(SPPFLike(), (1, 3, 16, 16), rules=False), "not a tensor")
    with pytest.raises(TrtQatError, match="sample input"):
        apply_rules(_quantized(SPPFLike(), (1, 3, 16, 16), rules=False), torch.zeros(1, 5, 16, 16))


# ---------------------------------------------------------------------------- architectures we did not write
def _residual_adds_through_dq(g):
    adds = [a for a in g.ops("Add") if all(t not in g.consts for t in a.input)]
    return adds, [a for a in adds if sum(g.dq_producer(t) is not None for t in a.input) != 1]


def test_torchvision_resnet18_residual_adds(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    trt_qat.quantize(model, QuantConfig(), sample_input=torch.zeros(1, 3, 64, 64))
    report = model.trt_qat_rules_report
    assert report.adds_quantized == 8 and not report.adds_left_alone
    assert report.maxpools == 1 and report.groups_merged >= 3  # conv1 + downsample share their input
    _calibrate(model, (2, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
    path = tmp_path / "resnet18.onnx"
    g = _export(model, (2, 3, 64, 64), path)
    adds, bad = _residual_adds_through_dq(g)
    assert len(adds) == 8 and not bad, [a.name for a in bad]
    for node in g.ops("MaxPool"):
        assert len(_distinct(g.scales_around(node))) == 1
    assert _ort_vs_torch(model, path, x) > 0.999


def test_torchvision_squeezenet_fire_concats(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(weights=None).eval()
    trt_qat.quantize(model, QuantConfig(), sample_input=torch.zeros(1, 3, 64, 64))
    report = model.trt_qat_rules_report
    assert report.concats == 8 and report.maxpools == 3
    for fire in (m for m in model.modules() if type(m).__name__ == "Fire"):
        assert fire.expand1x1._input_quantizer is fire.expand3x3._input_quantizer
    _calibrate(model, (2, 3, 64, 64), method="percentile")
    path = tmp_path / "squeezenet.onnx"
    g = _export(model, (2, 3, 64, 64), path)
    cats = g.ops("Concat")
    assert len(cats) == 8
    for node in cats + g.ops("MaxPool"):
        scales = g.scales_around(node)
        assert scales and len(_distinct(scales)) == 1, (node.name, scales)
    assert _ort_vs_torch(model, path, torch.randn(2, 3, 64, 64)) > 0.999


def test_torchvision_mobilenet_v3_inverted_residuals():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    trt_qat.quantize(model, QuantConfig(), sample_input=torch.zeros(1, 3, 32, 32))
    report = model.trt_qat_rules_report
    # every InvertedResidual with use_res_connect gets its block input quantized, and nothing is left alone
    n_res = sum(1 for m in model.modules() if getattr(m, "use_res_connect", False))
    assert n_res > 0 and report.adds_quantized == n_res and not report.adds_left_alone


# ------------------------------------------------------------------------------------------- built-in detector
def _yolo():
    yolo = pytest.importorskip("trt_qat.models.yolo")
    torch.manual_seed(0)
    return yolo.build_model("yolo-n").eval()


def test_builtin_detector_placement(tmp_path):
    model = _yolo()
    trt_qat.quantize(model, QuantConfig(), sample_input=torch.zeros(1, 3, 128, 128))
    report = model.trt_qat_rules_report
    assert report.concats >= 6 and report.maxpools >= 3 and report.resizes == 2
    assert report.adds_quantized >= 1 and not report.adds_left_alone
    g_data = torch.Generator().manual_seed(0)
    trt_qat.calibrate(model, [torch.rand(2, 3, 128, 128, generator=g_data) for _ in range(2)], method="max",
                      progress=False)
    path = tmp_path / "yolo.onnx"
    g = _export(model, (1, 3, 128, 128), path)
    for node in g.ops("Concat") + g.ops("MaxPool") + g.ops("Resize"):
        assert len(_distinct(g.scales_around(node))) <= 1, node.name
    adds = [a for a in g.ops("Add") if any(g.dq_producer(t) is not None for t in a.input)]
    assert len(adds) == report.adds_quantized
    assert all(sum(g.dq_producer(t) is not None for t in a.input) == 1 for a in adds)
    try:
        from trt_qat.onnx.lint import lint_onnx
    except ImportError:  # pragma: no cover - the linter ships with trt_qat
        return
    lint = lint_onnx(str(path))
    assert lint.stats["scale_mismatches"] == 0 and lint.stats["requantize_chains"] == 0
    assert lint.stats["int8_coverage"] >= 0.99
    assert not lint.by_code("add-not-fused")
