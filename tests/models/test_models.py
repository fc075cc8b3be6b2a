"""Built-in detector: shapes, decode, ONNX export with a dynamic batch, loss, NMS and checkpoints."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from trt_qat.errors import TrtQatError
from trt_qat.models.loss import YoloLoss, detection_loss_fn
from trt_qat.models.postprocess import non_max_suppression
from trt_qat.models.yolo import DEFAULT_STRIDES, build_model, load_checkpoint, save_checkpoint

NC = 10
NO = NC + 5



@pytest.fixture(scope="module")
def model_n():
    torch.manual_seed(0)
    return build_model("yolo-n", nc=NC)


def _targets():
    # (batch_idx, cls, cx, cy, w, h) normalized; sizes 14-45 px at 128 px
    return torch.tensor([[0, 1, 0.30, 0.30, 0.12, 0.18],
                         [0, 3, 0.70, 0.60, 0.30, 0.35],
                         [1, 5, 0.50, 0.50, 0.11, 0.14],
                         [2, 9, 0.20, 0.80, 0.20, 0.25],
                         [3, 0, 0.55, 0.45, 0.35, 0.30]])


@pytest.mark.parametrize("name", ["yolo-n", "yolo-s"])
def test_forward_shapes_train_and_eval(name):
    model = build_model(name, nc=NC)
    x = torch.rand(2, 3, 128, 128)
    model.train()
    maps = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 3, 128 // s, 128 // s, NO) for s in DEFAULT_STRIDES]
    model.eval()
    with torch.no_grad():
        y = model(x)
    n_boxes = sum(3 * (128 // s) ** 2 for s in DEFAULT_STRIDES)
    assert tuple(y.shape) == (2, n_boxes, NO)
    assert torch.all((y[..., 4:] >= 0) & (y[..., 4:] <= 1))
    assert model.cfg["name"] == name and model.cfg["nc"] == NC
    # non-square input works too
    with torch.no_grad():
        assert model(torch.rand(1, 3, 96, 160)).shape[1] == sum(3 * (96 // s) * (160 // s) for s in DEFAULT_STRIDES)


def test_s_is_wider_than_n():
    n = sum(p.numel() for p in build_model("yolo-n").parameters())
    s = sum(p.numel() for p in build_model("yolo-s").parameters())
    assert 3 * n < s < 5 * n


def test_decode_formula_with_a_constant_head():
    model = build_model("yolo-n", nc=NC).eval()
    for conv in model.detect.m:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        y = model(torch.rand(1, 3, 128, 128))[0]
    # every sigmoid is 0.5: xy = (grid + 0.5) * stride, wh = anchor, scores 0.5
    first = y[: 3 * 16 * 16].view(3, 16, 16, NO)
    anchors = model.detect.anchors[0]
    assert torch.allclose(first[0, 0, 0, :2], torch.tensor([4.0, 4.0]))
    assert torch.allclose(first[1, 2, 5, :2], torch.tensor([(5 + 0.5) * 8, (2 + 0.5) * 8]))
    assert torch.allclose(first[2, 7, 7, 2:4], anchors[2])
    assert torch.allclose(y[:, 4:], torch.full_like(y[:, 4:], 0.5))
    last = y[-1]
    assert torch.allclose(last[:2], torch.tensor([(3 + 0.5) * 32, (3 + 0.5) * 32]))
    assert torch.allclose(last[2:4], model.detect.anchors[2, 2])


def test_head_bias_priors(model_n):
    b = model_n.detect.m[0].bias.detach().view(3, NO)
    assert torch.all(b[:, 4] < -3.0)                          # few objects per P3 cell
    assert torch.allclose(b[:, 5:], torch.full_like(b[:, 5:], float(np.log(0.6 / (NC - 0.99)))), atol=0.2)


@pytest.mark.parametrize("opset", [13, 17])
def test_onnx_export_dynamic_batch_matches_torch(model_n, opset):
    ort = pytest.importorskip("onnxruntime")
    model = model_n.eval()
    buf = io.BytesIO()
    torch.onnx.export(model, torch.rand(1, 3, 128, 128), buf, opset_version=opset, input_names=["images"],
                      output_names=["output"], dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}},
                      dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for bs in (1, 3):
        x = torch.rand(bs, 3, 128, 128)
        got = sess.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == want.shape == (bs, 1008, NO)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_loss_finite_backward_and_decreasing():
    torch.manual_seed(0)
    model = build_model("yolo-n", nc=NC).train()
    imgs = torch.rand(4, 3, 128, 128)
    targets = _targets()
    loss_fn = detection_loss_fn(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(20):
        loss = loss_fn(model, (imgs, targets, [{}] * 4))
        assert loss.ndim == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert len(grads) == sum(1 for _ in model.parameters())
            assert any(g.abs().sum() > 0 for g in grads)
            assert model.detect.m[0].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    items = loss_fn.last_items
    assert items.shape == (3,) and torch.all(items >= 0)
    assert losses[-1] < 0.6 * losses[0]


def test_loss_scales_with_batch_and_handles_no_targets(model_n):
    model_n.train()
    crit = YoloLoss(model_n)
    preds = model_n(torch.rand(2, 3, 128, 128))
    loss, items = crit(preds, torch.zeros((0, 6)))
    assert torch.isfinite(loss) and items[0] == 0 and items[2] == 0 and items[1] > 0
    assert torch.isclose(loss, items.sum() * 2)
    with pytest.raises(TrtQatError, match="train"):
        crit(torch.zeros(2, 10, NO), torch.zeros((0, 6)))


def test_nms_hand_made_case():
    def row(cx, cy, w, h, obj, cls, p=1.0):
        r = [cx, cy, w, h, obj] + [0.0] * NC
        r[5 + cls] = p
        return r

    pred = torch.tensor([[
        row(50, 50, 20, 20, 0.9, 2),        # kept (best of its cluster)
        row(51, 50, 20, 20, 0.8, 2),        # same class, IoU ~0.9 -> suppressed
        row(51, 50, 20, 20, 0.7, 4),        # other class, same place -> kept
        row(100, 100, 10, 10, 0.6, 1),      # separate -> kept
        row(20, 20, 10, 10, 0.0005, 1),     # below conf_thres -> dropped
    ], [row(64, 64, 30, 30, 0.5, 7, p=0.5)] + [row(0, 0, 0, 0, 0.0, 0)] * 4])
    out = non_max_suppression(pred, conf_thres=0.001, iou_thres=0.6)
    assert len(out) == 2
    a = out[0]
    assert a.shape == (3, 6)
    assert torch.allclose(a[:, 4], torch.tensor([0.9, 0.7, 0.6]))
    assert a[:, 5].tolist() == [2.0, 4.0, 1.0]
    assert torch.allclose(a[0, :4], torch.tensor([40.0, 40.0, 60.0, 60.0]))
    b = out[1]
    assert b.shape == (1, 6) and abs(b[0, 4].item() - 0.25) < 1e-6 and b[0, 5].item() == 7
    # numpy in, same answer; max_det caps
    np_out = non_max_suppression(pred.numpy(), conf_thres=0.001, iou_thres=0.6, max_det=2)
    assert np_out[0].shape == (2, 6) and torch.allclose(np_out[0], a[:2])
    assert non_max_suppression(torch.zeros(1, 7, NO))[0].shape == (0, 6)


def test_checkpoint_round_trip_and_errors(tmp_path, model_n):
    path = save_checkpoint(model_n, tmp_path / "ck" / "best.pt", epoch=3, map50=0.5)
    model, ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["model_cfg"]["scale"] == "n"
    assert not model.training
    x = torch.rand(1, 3, 128, 128)
    model_n.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model_n(x))
    assert not list(tmp_path.joinpath("ck").glob("*.tmp"))
    with pytest.raises(TrtQatError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TrtQatError, match="cannot be read") as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value)


def test_build_model_rejects_unknown_names():
    with pytest.raises(TrtQatError, match="yolo-n"):
        build_model("yolo-x")
