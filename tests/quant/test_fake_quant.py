"""trt_qat.quant.fake_quant: the fast fake-quant equals torch's ops, ONNX Q/DQ and pytorch-quantization."""
import pytest
import torch

from trt_qat.quant import fake_quant as fake_quant_mod
from trt_qat.quant.fake_quant import fake_quant
from trt_qat.quant.quantizer import TrtQuantizer


def _quantizer(amax, axis=None, native=True, unsigned=False):
    q = TrtQuantizer(axis=axis)
    q._unsigned = unsigned
    q.set_amax(torch.as_tensor(amax, dtype=torch.float32))
    q.native = native
    return q


def _torch_fq(x, amax, axis=None, unsigned=False):
    """torch's own fake-quant ops, the ONNX Q/DQ semantics (the reference for trt_qat's fast CPU path)."""
    qmin, qmax = (0, 255) if unsigned else (-128, 127)
    bound = qmax
    if axis is None:
        scale = (amax.reshape(()) / bound).float()
        return torch.fake_quantize_per_tensor_affine(x, scale, torch.zeros((), dtype=torch.int32), qmin, qmax)
    scale = (amax.reshape(-1) / bound).float()
    return torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(scale.numel(), dtype=torch.int32), axis,
                                                  qmin, qmax)


def _with_ties(x, scale, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = x.reshape(-1)
    k = min(n, flat.numel())
    flat[:k] = (torch.randint(-140, 140, (k,), generator=g).float() + 0.5) * scale  # exact .5 ties
    return x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("spread", [0.5, 1.6])  # no clipping / clipping
def test_per_tensor_fast_path_is_torch_fake_quant_bit_for_bit(channels_last, spread):
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        amax = torch.rand((), generator=g) * 5 + 0.05
        x = torch.randn(2, 8, 7, 7, generator=g) * float(amax) * spread
        x = _with_ties(x, float(amax) / 127, seed=trial)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = _quantizer(amax)(a)
        yb = _torch_fq(b, amax)
        grad = torch.randn(ya.shape, generator=g)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(ya, yb)
        assert torch.equal(a.grad, b.grad)
        with torch.no_grad():
            assert torch.equal(_quantizer(amax)(x), yb)


@pytest.mark.parametrize("scale_amax", [0.7, 1.0])  # some channels clip / none clips
def test_per_channel_fast_path_is_torch_fake_quant_bit_for_bit(scale_amax):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 8, 3, 3, generator=g)
    amax = w.abs().amax(dim=(1, 2, 3), keepdim=True) * scale_amax
    q = _quantizer(amax, axis=0)
    for _ in range(2):  # the second call reuses the cached scales
        a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
        ya, yb = q(a), _torch_fq(b, amax, axis=0)
        grad = torch.randn(ya.shape, generator=g)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("shape,axis", [((6, 5, 3, 3), 1), ((12, 7), 0)])  # ConvTranspose (axis 1), Linear
def test_per_channel_other_axes(shape, axis):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(*shape, generator=g)
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.abs().amax(dim=dims, keepdim=True) * 0.9
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    ya, yb = _quantizer(amax, axis=axis)(a), _torch_fq(b, amax, axis=axis)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


def test_unsigned_and_zero_amax_follow_torch():
    x = torch.rand(1000) * 3
    amax = torch.tensor(2.0)
    assert torch.equal(fake_quant(x, amax, unsigned=True), _torch_fq(x, amax, unsigned=True))
    tiny = torch.tensor(0.0)  # degenerate scale: torch's op decides
    x = torch.randn(10)
    ref = torch.fake_quantize_per_tensor_affine(x, torch.tensor(0.0), torch.zeros((), dtype=torch.int32), -128, 127)
    torch.testing.assert_close(fake_quant(x, tiny), ref, equal_nan=True)


def test_fast_path_matches_pytorch_quantization_reference_where_ranges_agree():
    """pytorch-quantization's default fake-quant computes round(x * (127/amax)) / (127/amax) and passes the gradient
    where |x| <= amax; torch's (ONNX/TensorRT) computes round(x / (amax/127)) * (amax/127) and passes it where the
    rounded value is in [-128, 127]. On inputs in [-amax, amax] and beyond |x| > amax + 2 * scale they agree to
    float precision, outputs and gradients."""
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        amax = torch.rand((), generator=g) * 4 + 0.1
        s = float(amax) / 127
        inside = (torch.rand(20000, generator=g) * 2 - 1) * float(amax)
        outside = torch.sign(torch.randn(2000, generator=g)) * (float(amax) + 2 * s + torch.rand(2000, generator=g))
        x = torch.cat([inside, outside])
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = _quantizer(amax)(a)
        yb = _quantizer(amax, native=False)(b)
        grad = torch.randn(x.shape, generator=g)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6 * float(amax))
        assert torch.equal(a.grad, b.grad)


def test_differences_to_the_reference_int8_minimum_and_gradient_band():
    amax, s = torch.tensor(1.27), 0.01
    x = torch.tensor([-1.29, -1.2849, -1.2751, -1.2749, -1.27, 0.0, 1.27, 1.2749, 1.2751, 1.29])
    ours, ref, narrow = _quantizer(amax), _quantizer(amax, native=False), _quantizer(amax, native=False)
    narrow._narrow_range = True  # pytorch-quantization's calibrators (and narrow_range=True) stop at -127
    expected = torch.tensor([-1.28, -1.28, -1.28, -1.27, -1.27, 0.0, 1.27, 1.27, 1.27, 1.27])
    torch.testing.assert_close(ours(x), expected)
    torch.testing.assert_close(ref(x), expected)  # TensorQuantizer's default is the full range too
    # narrow range: differs exactly where x < -127.5 * scale (-128 * scale in TensorRT/ONNX, -127 * scale there)
    diff = (ours(x) - narrow(x)).abs()
    assert torch.equal(diff > 1e-6, x < -127.5 * s)
    # gradient: TensorRT/ONNX semantics pass it for x in [-128.5, 127.5) * scale, the reference for |x| <= amax
    grads = []
    for q in (ours, ref):
        xi = x.clone().requires_grad_()
        q(xi).sum().backward()
        grads.append(xi.grad)
    assert grads[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert grads[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_fake_quant_matches_onnx_quantize_dequantize_linear(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    amax = torch.tensor(2.54)
    scale = float((amax / 127).float())
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
                               helper.make_tensor("z", TensorProto.INT8, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "qdq.onnx"
    onnx.save(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x):
        return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])

    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(20000, generator=g) * 2.0, torch.tensor([-1e3, -2.58, -2.57, 2.55, 1e3])])
    assert torch.equal(fake_quant(x, amax), run(x))  # including saturation at -128 and 127
    # exact ties x = (k + 0.5) * scale: ONNX divides by the scale, torch (and so trt_qat, in training and in the
    # traced export) multiplies by 1/scale; both round half to even, so they can differ by one step at a tie
    ties = (torch.arange(-130, 130).float() + 0.5) * scale
    ours, onnx_y = fake_quant(ties, amax), run(ties)
    assert torch.equal(onnx_y, torch.clamp(torch.round(ties / scale), -128, 127) * scale)
    assert torch.equal(ours, torch.fake_quantize_per_tensor_affine(ties, scale, 0, -128, 127))
    assert float((ours - onnx_y).abs().max()) <= scale * 1.0001


def test_whole_model_loss_and_gradients_identical_to_torch_ops():
    from trt_qat.config import QuantConfig
    from trt_qat.models.loss import detection_loss_fn
    from trt_qat.models.yolo import build_model
    from trt_qat.quant.instrument import quantize
    from trt_qat.quant.quantizer import iter_quantizers

    torch.manual_seed(0)
    model = quantize(build_model("yolo-n"), QuantConfig())
    g = torch.Generator().manual_seed(5)
    imgs = torch.rand(2, 3, 64, 64, generator=g)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.3, 0.6, 0.2, 0.3]])
    for module in model.modules():
        q = getattr(module, "_weight_quantizer", None)
        if q is not None:  # some channels clip
            q.set_amax(module.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) * 0.8)
    for _, q in iter_quantizers(model):
        if q.role != "weight":
            q.set_amax(torch.tensor(1.5))
    model.train()
    loss_fn = detection_loss_fn(model)
    results = []
    for fast in (True, False):
        fake_quant_mod.FAST_CPU_FAKE_QUANT = fast
        try:
            model.zero_grad()
            loss = loss_fn(model, (imgs, targets, None))
            loss.backward()
        finally:
            fake_quant_mod.FAST_CPU_FAKE_QUANT = True
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_shared_input_is_fake_quantized_once_with_correct_gradients():
    a, b = _quantizer(torch.tensor(1.0)), _quantizer(torch.tensor(1.0))
    x = (torch.randn(1000) * 1.5).requires_grad_()
    ya, yb = a(x), b(x)
    assert ya is yb  # same tensor, same scale: one node
    (ya * 2 + yb * 3).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    y = _torch_fq(ref_x, torch.tensor(1.0))
    (y * 5).sum().backward()
    assert torch.equal(x.grad, ref_x.grad)
    c = _quantizer(torch.tensor(0.5))  # another scale is computed on its own
    assert c(x) is not ya
    with torch.no_grad():
        y1 = a(x)
        y1.add_(1.0)  # a consumer changed the shared output in place: it is not handed out again
        assert b(x) is not y1


def test_eval_reuses_weight_fake_quant_until_weight_or_amax_change():
    conv = torch.nn.Conv2d(4, 8, 3)
    w = conv.weight
    q = _quantizer(w.detach().abs().amax(dim=(1, 2, 3), keepdim=True) * 0.9, axis=0)
    with torch.no_grad():
        y1 = q(w)
        assert q(w) is y1
        w.mul_(1.5)  # in-place update bumps the version
        y2 = q(w)
        assert y2 is not y1 and torch.equal(y2, _torch_fq(w, q.amax, axis=0))
        q.set_amax(q.amax * 2)  # .data.copy_ does not bump the version: amax itself is compared
        y3 = q(w)
        assert torch.equal(y3, _torch_fq(w, q.amax, axis=0))
    y4 = q(w)  # with grad: never the cached tensor
    assert y4.requires_grad



def test_quantizer_caches_survive_deepcopy_and_pickle():
    import copy
    import pickle

    conv = torch.nn.Conv2d(4, 8, 3)
    q = _quantizer(conv.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True), axis=0)
    with torch.no_grad():
        y = q(conv.weight)
    clone = copy.deepcopy(q)
    again = pickle.loads(pickle.dumps(q))
    with torch.no_grad():
        assert torch.equal(clone(conv.weight), y) and torch.equal(again(conv.weight), y)
