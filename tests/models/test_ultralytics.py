"""Ultralytics adapter: build offline, data-only save/load, foreign .pt through the adapter only, their loss on our
batches, decode + NMS, and quantize -> calibrate -> Q/DQ ONNX that ONNX Runtime runs."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("ultralytics", reason="the ultralytics model family needs `pip install trt-qat[ultralytics]`")

from trt_qat.config import QuantConfig  # noqa: E402
from trt_qat.errors import TrtQatError  # noqa: E402
from trt_qat.fileio import read_checkpoint  # noqa: E402
from trt_qat.models.adapter import adapter_for_checkpoint, get_adapter, load_fp32  # noqa: E402

NC, IMGSZ = 10, 64
N_ANCHORS = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
TARGETS = torch.tensor([[0, 1, 0.30, 0.30, 0.20, 0.30],
                        [0, 3, 0.70, 0.60, 0.30, 0.35],
                        [1, 5, 0.50, 0.50, 0.25, 0.20]])


@pytest.fixture(scope="module")
def adapter():
    return get_adapter("ultralytics")


@pytest.fixture(scope="module")
def model(adapter):
    torch.manual_seed(0)
    return adapter.build("yolov8n.yaml", nc=NC)


def test_build_shapes_and_metadata(adapter, model):
    assert adapter.family == "ultralytics" and adapter.output_names == ("output0",)
    assert adapter_for_checkpoint({"model_family": "ultralytics"}) is adapter
    assert adapter.num_classes(model) == NC and adapter.model_name(model) == "yolov8n"
    assert adapter.class_names(model) is None  # placeholder names of a fresh model are not checked against data
    assert list(adapter.float_layers(model)) == ["model.22.dfl.conv"]
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (2, 4 + NC, N_ANCHORS)  # export mode: no (y, raw)
    assert torch.all((y[:, 4:] >= 0) & (y[:, 4:] <= 1))
    model.train()
    raw = model(x)
    assert tuple(raw["boxes"].shape) == (2, 64, N_ANCHORS) and tuple(raw["scores"].shape) == (2, NC, N_ANCHORS)


def test_bad_inputs_are_one_line_errors(adapter, tmp_path):
    for name, match in (("yolov8n.pt", "not an Ultralytics model yaml"), ("nope9z.yaml", "was not found")):
        with pytest.raises(TrtQatError, match=match):
            adapter.build(name, NC)
    with pytest.raises(TrtQatError, match="multiple of 32"):
        adapter.sample_input(70)
    with pytest.raises(TrtQatError, match="holds no Ultralytics model"):
        adapter.from_checkpoint({"epoch": 1}, "x.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TrtQatError, match="cannot be read") as err:
        adapter.load(bad)
    assert "\n" not in str(err.value)


def test_save_load_round_trip_is_data_only(adapter, model, tmp_path):
    path = adapter.save(model, tmp_path / "u.pt", epoch=3)
    ckpt = read_checkpoint(path)  # weights_only=True reads it: no pickled code
    assert ckpt["model_family"] == "ultralytics" and ckpt["epoch"] == 3 and ckpt["model_cfg"]["nc"] == NC
    loaded, _ = adapter.load(path)
    same, family = load_fp32(path)
    assert family is adapter
    want = model.state_dict()
    for other in (loaded, same):
        got = other.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert not other.training
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_ultralytics_pt_loads_only_through_the_adapter(adapter, tmp_path):
    from ultralytics import YOLO

    path = tmp_path / "yolo.pt"
    YOLO("yolov8n.yaml").save(path)  # Ultralytics' own format: a pickled (half) module under "model"
    with pytest.raises(TrtQatError, match="holds code"):
        read_checkpoint(path)
    model, ckpt = adapter.load(path)
    assert adapter.recognizes(ckpt) and adapter_for_checkpoint(ckpt) is adapter
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert adapter.num_classes(model) == 80
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, IMGSZ, IMGSZ)).shape) == (1, 84, N_ANCHORS)
    again, _ = adapter.load(adapter.save(model, tmp_path / "ours.pt"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_loss_fn_is_finite_with_gradients(adapter, model):
    loss_fn = adapter.loss_fn(model)
    model.train()
    model.zero_grad()
    loss = loss_fn(model, (torch.rand(2, 3, IMGSZ, IMGSZ), TARGETS, []))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    head = model.model[-1]
    assert head.cv2[0][-1].weight.grad.abs().sum() > 0 and head.cv3[0][-1].weight.grad.abs().sum() > 0
    assert tuple(loss_fn.last_items.shape) == (3,)  # box, cls, dfl
    empty = loss_fn(model, (torch.rand(2, 3, IMGSZ, IMGSZ), torch.zeros(0, 6), []))
    assert torch.isfinite(empty)
    model.zero_grad()


def test_decode_nms_by_hand_and_on_the_model(adapter, model):
    pred = torch.zeros(1, 4 + 3, 4)
    pred[0, :4] = torch.tensor([[20, 21, 10, 20], [20, 20, 10, 20], [20, 21, 10, 20], [30, 30, 30, 30]]).T.float()
    pred[0, 4:, 0] = torch.tensor([0.9, 0.0, 0.0])  # box 0: class 0
    pred[0, 4:, 1] = torch.tensor([0.8, 0.0, 0.0])  # box 1: class 0, overlaps box 0 -> suppressed
    pred[0, 4:, 2] = torch.tensor([0.0, 0.0, 0.7])  # box 2 is box 0 again, but of another class -> kept
    pred[0, 4:, 3] = torch.tensor([0.0, 0.0005, 0.0])  # below conf_thres
    (det,) = adapter.decode({"output0": pred.numpy()}, conf_thres=0.001, iou_thres=0.5)
    assert det.shape == (2, 6)
    assert torch.allclose(det[0], torch.tensor([15.0, 11.0, 25.0, 31.0, 0.9, 0.0]))
    assert torch.allclose(det[1], torch.tensor([15.0, 11.0, 25.0, 31.0, 0.7, 2.0]))
    end2end = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 0.9, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]])
    assert adapter.decode({"output0": end2end})[0].shape == (1, 6)
    with pytest.raises(TrtQatError, match="first output has shape"):
        adapter.decode({"output0": np.zeros((2, 3))})
    model.eval()
    with torch.no_grad():
        dets = adapter.decode({"output0": model(torch.rand(2, 3, IMGSZ, IMGSZ)).numpy()}, max_det=50)
    assert len(dets) == 2 and all(d.ndim == 2 and d.shape[1] == 6 and d.shape[0] <= 50 for d in dets)


def test_quantize_calibrate_export_runs_in_onnxruntime(adapter, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    import trt_qat

    torch.manual_seed(0)
    model = adapter.tag(adapter.build("yolov8n.yaml", nc=NC).eval())
    sample = adapter.sample_input(IMGSZ)
    skip = [re.escape(name) + "$" for name in adapter.float_layers(model)]
    trt_qat.quantize(model, QuantConfig(skip=skip), sample_input=sample)
    assert [row[0] for row in model.trt_qat_skipped] == ["model.22.dfl.conv"]
    trt_qat.calibrate(model, [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)], method="max", progress=False)
    path = trt_qat.export_onnx(model, sample, tmp_path / "u.onnx", input_names=adapter.input_names,
                               output_names=adapter.output_names)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 3, IMGSZ, IMGSZ), dtype=np.float32)
    (out,) = sess.run(None, {"images": x})
    assert [o.name for o in sess.get_outputs()] == ["output0"] and out.shape == (3, 4 + NC, N_ANCHORS)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(out - want).max() < 1e-2 * max(1.0, np.abs(want).max())
    assert len(adapter.decode({"output0": out})) == 3
    # a quantized checkpoint rebuilds the bare architecture through the adapter (model_cfg is plain data)
    trt_qat.save_quantized(model, tmp_path / "q.pt")
    again, _ = trt_qat.load_quantized(tmp_path / "q.pt")
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(torch.from_numpy(x)), model(torch.from_numpy(x)), atol=1e-4)


def test_import_never_loads_ultralytics_and_missing_package_is_one_line():
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ultralytics":
                    raise ImportError(f"{name} blocked for this test")
        sys.meta_path.insert(0, Block())
        import trt_qat
        from trt_qat.errors import TrtQatError
        from trt_qat.models.adapter import adapter_for_checkpoint, get_adapter
        adapter = get_adapter("ultralytics")
        assert not adapter.recognizes({"model": None}) and adapter_for_checkpoint({}).family == "builtin"
        assert "ultralytics" not in sys.modules
        try:
            adapter.build("yolov8n.yaml", 3)
        except TrtQatError as exc:
            print("ERROR", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and "pip install trt-qat[ultralytics]" in lines[0]


@pytest.mark.parametrize("cfg, task", [("yolov8n-seg.yaml", "instance segmentation"), ("yolov8n-pose.yaml", "pose"),
                                       ("yolov8n-obb.yaml", "oriented boxes"), ("yolov8n-cls.yaml", "classification"),
                                       ("rtdetr-l.yaml", "RT-DETR")])
def test_other_tasks_are_refused_saying_what_was_found(cfg, task, tmp_path, capsys):
    """A segment/pose/OBB/classify/RT-DETR .pt, written by Ultralytics itself: one line naming the task found and
    what is supported, exit 2, nothing written."""
    from ultralytics import RTDETR, YOLO

    from trt_qat.__main__ import main

    (RTDETR if cfg.startswith("rtdetr") else YOLO)(cfg).save(str(tmp_path / "m.pt"))
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--checkpoint", str(tmp_path / "m.pt"), "--model-family", "ultralytics", "--data", "d.yaml",
              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert task in err[0] and "supports detection models" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_pt_saved_after_fuse_is_refused_with_the_reason(tmp_path):
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    yolo.model.fuse(verbose=False)  # what predict() does before a YOLO(...).save()
    yolo.save(str(tmp_path / "fused.pt"))
    with pytest.raises(TrtQatError, match="fused by predict.. or fuse..; .*best.pt"):
        load_fp32(tmp_path / "fused.pt", "ultralytics")


def test_a_fused_model_rebuilds_from_its_architecture(adapter):
    """A model fused in memory (BN folded, passed to the API) is described as fused and rebuilt the same way."""
    fused = adapter.build("yolov8n.yaml", nc=NC).eval()
    fused.fuse(verbose=False)
    arch = adapter.architecture(fused)
    assert arch["fused"] is True and adapter.architecture(adapter.build("yolov8n.yaml", nc=NC))["fused"] is False
    again = adapter.from_architecture(arch).eval()
    again.load_state_dict(fused.state_dict())
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))


def test_image_size_comes_from_the_checkpoint_and_must_fit_the_stride(adapter, model, tmp_path):
    from trt_qat.models.adapter import checkpoint_imgsz

    assert checkpoint_imgsz({"train_args": {"imgsz": 640}}) == 640
    assert checkpoint_imgsz({"train_args": {"imgsz": [480, 640]}}) == 640
    assert checkpoint_imgsz({"imgsz": 96, "train_args": {"imgsz": 640}}) == 96  # (calibrated at 96)
    assert checkpoint_imgsz({"train_args": {}}) is None and checkpoint_imgsz({"imgsz": True}) is None
    adapter.save(model, tmp_path / "m.pt", train_args={"imgsz": 96})
    loaded, _ = load_fp32(tmp_path / "m.pt")
    assert loaded.trt_qat_imgsz == 96
    assert adapter.max_stride(loaded) == 32 and adapter.check_imgsz(loaded, 96) == 96
    with pytest.raises(TrtQatError, match="not a multiple of 32, the model's largest stride; use 96 or 128"):
        adapter.check_imgsz(loaded, 112)


def test_e2e_loss_gains_follow_the_training_progress(adapter):
    """YOLO26's E2ELoss: QAT of a trained model uses the gains Ultralytics' schedule ends with; training from
    scratch starts at the initial ones and decays them epoch by epoch (TrainingProgress hook)."""
    from types import SimpleNamespace

    from trt_qat.train.fp32 import TrainingProgress

    net = adapter.build("yolo26n.yaml", nc=NC).train()
    loss_fn = adapter.loss_fn(net)
    batch = (torch.rand(2, 3, IMGSZ, IMGSZ), TARGETS)
    assert torch.isfinite(loss_fn(net, batch))
    assert type(loss_fn.criterion).__name__ == "E2ELoss"
    assert loss_fn.criterion.o2m == pytest.approx(0.1) and loss_fn.criterion.o2o == pytest.approx(0.9)
    hook = TrainingProgress(loss_fn)
    for epoch, o2m in ((0, 0.8), (2, 0.45), (4, 0.1)):
        hook.on_epoch_start(SimpleNamespace(epoch=epoch, epochs=5))
        loss_fn(net, batch)
        assert loss_fn.criterion.o2m == pytest.approx(o2m)


def test_data_yaml_whose_classes_disagree_with_the_checkpoint_is_refused(adapter, tmp_path):
    from fixtures_data import make_tiny_digits

    class Factory:  # (make_tiny_digits takes a tmp_path_factory)
        @staticmethod
        def mktemp(name):
            return tmp_path / name

    data = make_tiny_digits(Factory)
    dataset = adapter.dataset(data, "val", imgsz=IMGSZ)
    named = adapter.build("yolov8n.yaml", nc=NC)
    named.names = {i: "abcdefghij"[i] for i in range(NC)}
    with pytest.raises(TrtQatError, match="names class 0 '0' but the model calls it 'a'"):
        adapter.check_dataset(named, dataset, "--data x")
    with pytest.raises(TrtQatError, match="nc=10 classes but the model predicts 3"):
        adapter.check_dataset(adapter.build("yolov8n.yaml", nc=3), dataset, "--data x")
    adapter.check_dataset(adapter.build("yolov8n.yaml", nc=NC), dataset, "--data x")  # placeholder names: no check


def test_yolo26_exports_end_to_end_and_decodes(adapter, tmp_path):
    """YOLO26 infers with its one-to-one head: the eval output (and the ONNX's output0) is the NMS-free
    [B, max_det, 6] (x1, y1, x2, y2, score, class), which decode only thresholds."""
    ort = pytest.importorskip("onnxruntime")
    import trt_qat

    torch.manual_seed(0)
    model = adapter.build("yolo26n.yaml", nc=NC).eval()
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        y = model(x)
    assert y.ndim == 3 and y.shape[0] == 2 and y.shape[2] == 6
    dets = adapter.decode({"output0": y.numpy()}, conf_thres=0.0)
    assert len(dets) == 2 and all(d.shape[1] == 6 for d in dets)
    path = trt_qat.export_onnx(model, adapter.sample_input(IMGSZ), tmp_path / "e2e.onnx",
                               input_names=adapter.input_names, output_names=adapter.output_names)
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    assert out.shape == tuple(y.shape)
    assert np.allclose(np.sort(out[..., 4], axis=1), np.sort(y.numpy()[..., 4], axis=1), atol=1e-5)  # same scores
