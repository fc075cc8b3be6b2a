"""Classic YOLOv5 adapter with the ultralytics/yolov5 code (a clone on PYTHONPATH or the PyPI ``yolov5`` package;
skipped when neither is importable, see requirements-dev.txt): YOLOv5n built offline from the code's yaml, a ``.pt``
written as yolov5's train.py writes it (module paths of a clone and of the package), recognised, refused without
--model-family, loaded, saved as data; yolov5's own loss with gradients; quantize -> calibrate -> Q/DQ ONNX that
ONNX Runtime runs like PyTorch."""
from __future__ import annotations

import copy
import io
import json
import re
import zipfile

import numpy as np
import pytest
import torch
from fixtures_data import tiny_digits_yaml  # noqa: F401  (pytest fixture)

from trt_qat.__main__ import main
from trt_qat.config import QuantConfig
from trt_qat.errors import TrtQatError
from trt_qat.fileio import pickle_globals, read_checkpoint
from trt_qat.models.adapter import family_of_pickle, get_adapter, load_fp32, read_checkpoint_or_name_family
from trt_qat.models.yolov5 import yolov5_code

NC, IMGSZ = 3, 64
N_BOXES = 3 * sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
TARGETS = torch.tensor([[0, 1, 0.30, 0.30, 0.20, 0.30],
                        [0, 2, 0.70, 0.60, 0.30, 0.35],
                        [1, 0, 0.50, 0.50, 0.25, 0.20]])


try:
    CODE = yolov5_code()
except TrtQatError as exc:
    pytest.skip(f"the ultralytics/yolov5 code is not importable: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def code():
    return CODE


@pytest.fixture(scope="module")
def adapter(code):
    return get_adapter("yolov5")


@pytest.fixture(scope="module")
def model(adapter):
    torch.manual_seed(0)
    return adapter.build("yolov5n.yaml", nc=NC)


def _train_py_checkpoint(code, path, prefix: str, nc: int = NC):
    """``{"model": model.half(), "ema": None, ...}`` as yolov5's train.py leaves it (after strip_optimizer), its
    pickle naming the yolov5 modules under ``prefix`` ("" for a clone's ``models.yolo``, "yolov5." for the
    package's)."""
    torch.manual_seed(1)
    raw = code.yolo.DetectionModel(cfg=str(code.root / "models" / "yolov5n.yaml"), ch=3, nc=nc)
    raw.nc, raw.names = nc, {0: "cat", 1: "dog", 2: "bird"} if nc == NC else [str(i) for i in range(nc)]
    raw.hyp = {"box": 0.05, "cls": 0.3, "cls_pw": 1.0, "obj": 0.7, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0,
               "label_smoothing": 0.0, "lr0": 0.01}
    half = copy.deepcopy(raw).half()
    for p in half.parameters():
        p.requires_grad_(False)
    buffer = io.BytesIO()
    torch.save({"epoch": -1, "best_fitness": None, "model": half, "ema": None, "updates": None, "optimizer": None,
                "opt": {"imgsz": 320, "epochs": 3}, "git": None, "date": "2026-01-01T00:00:00"}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():  # GLOBAL opcodes are "c<module>\n<name>\n": rename the modules in place
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                for top in ("models", "utils"):
                    data = data.replace(f"c{code.prefix}{top}.".encode(), f"c{prefix}{top}.".encode())
            dst.writestr(info, data)
    return raw.float().eval(), path


def test_build_shapes_and_metadata(adapter, model):
    assert adapter.num_classes(model) == NC and adapter.model_name(model) == "yolov5n"
    assert adapter.class_names(model) is None and adapter.float_layers(model) == {}
    assert int(model.stride.max()) == 32
    with pytest.raises(TrtQatError, match="multiple of 32"):
        adapter.sample_input(80, model=model)
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (2, N_BOXES, 5 + NC)  # one tensor, not (y, raw)
    assert torch.all((y[..., 4:] >= 0) & (y[..., 4:] <= 1))
    model.train()
    raw = model(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, IMGSZ // s, IMGSZ // s, 5 + NC) for s in (8, 16, 32)]
    with pytest.raises(TrtQatError, match="not a yolov5 model yaml"):
        adapter.build("yolov5n.pt", NC)
    with pytest.raises(TrtQatError, match="was not found"):
        adapter.build("nope9z.yaml", NC)


@pytest.mark.parametrize("prefix", ["", "yolov5."], ids=["clone-names", "package-names"])
def test_train_py_checkpoint_recognised_refused_then_loaded(adapter, code, tmp_path, prefix):
    raw, path = _train_py_checkpoint(code, tmp_path / "yolov5n.pt", prefix)
    assert f"{prefix}models.yolo DetectionModel" in pickle_globals(path) and family_of_pickle(path) == "yolov5"
    with pytest.raises(TrtQatError, match="pass --model-family yolov5"):
        read_checkpoint_or_name_family(path)
    model, family = load_fp32(path, family="yolov5")
    assert family is adapter and not model.training and model.trt_qat_imgsz == 320
    assert type(model).__module__ == code.yolo.DetectionModel.__module__  # the importable code's classes
    assert adapter.class_names(model) == ["cat", "dog", "bird"] and model.hyp["cls"] == 0.3
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    want = raw.state_dict()
    assert all(torch.equal(v, want[k].half().float()) for k, v in model.state_dict().items())
    ours = adapter.save(model, tmp_path / "ours.pt", epoch=4)
    ckpt = read_checkpoint(ours)  # weights_only=True reads it: no pickled code
    assert ckpt["model_family"] == "yolov5" and ckpt["model_cfg"]["names"] == ["cat", "dog", "bird"]
    again, family = load_fp32(ours)
    assert family is adapter and again.hyp == model.hyp and adapter.model_name(again) == "yolov5n"
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_unpickler_still_refuses_functions(adapter, tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:  # {"model": os.system("true")}
        zf.writestr("archive/data.pkl", b"\x80\x02}X\x05\x00\x00\x00modelcos\nsystem\nX\x04\x00\x00\x00true\x85Rs.")
        zf.writestr("archive/version", "3\n")
    with pytest.raises(TrtQatError, match="not allowed"):
        adapter.load(path)


def test_other_repositories_and_older_releases(adapter, code, tmp_path):
    from test_yolov5 import _write_pt

    yolov7 = _write_pt(tmp_path / "yolov7.pt", [("models.yolo", "Model"), ("models.yolo", "IDetect")])
    with pytest.raises(TrtQatError, match="names code that the yolov5 .* does not have.*YOLOv7"):
        adapter.load(yolov7)
    torch.manual_seed(0)
    old = code.yolo.DetectionModel(cfg=str(code.root / "models" / "yolov5n.yaml"), ch=3, nc=NC)
    head = old.model[-1]  # before v6.0 anchor_grid was a buffer; before torch 1.11 Upsample had no such attribute
    del head.anchor_grid
    head.register_buffer("anchor_grid", torch.zeros(head.nl, 1, head.na, 1, 1, 2))
    del old.model[11].recompute_scale_factor
    model = adapter.from_checkpoint({"model": old, "ema": None}, "old.pt")
    with torch.no_grad():
        assert tuple(model(torch.rand(1, 3, IMGSZ, IMGSZ)).shape) == (1, N_BOXES, 5 + NC)


def test_yolov5_loss_is_finite_with_gradients(adapter, model):
    loss_fn = adapter.loss_fn(model)
    model.train()
    model.zero_grad()
    loss = loss_fn(model, (torch.rand(2, 3, IMGSZ, IMGSZ), TARGETS, []))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(conv.weight.grad.abs().sum() > 0 for conv in model.model[-1].m)
    assert tuple(loss_fn.last_items.shape) == (3,)  # box, obj, cls
    assert model.hyp["obj"] == pytest.approx(1.0 * (IMGSZ / 640) ** 2)  # scratch-low, scaled as train.py does
    assert torch.isfinite(loss_fn(model, (torch.rand(2, 3, IMGSZ, IMGSZ), torch.zeros(0, 6), [])))
    model.zero_grad()


def test_quantize_calibrate_export_runs_in_onnxruntime(adapter, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    import trt_qat

    torch.manual_seed(0)
    model = adapter.tag(adapter.build("yolov5n.yaml", nc=NC).eval())
    sample = adapter.sample_input(IMGSZ)
    trt_qat.quantize(model, QuantConfig(), sample_input=sample)
    trt_qat.calibrate(model, [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)], method="max", progress=False)
    path = trt_qat.export_onnx(model, sample, tmp_path / "y5.onnx", input_names=adapter.input_names,
                               output_names=adapter.output_names)
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(re.search(r"DequantizeLinear", {o: n.op_type for n in graph.node for o in n.output}
                                   .get(c.input[1], "")) for c in convs)  # every conv's weight is INT8
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 3, IMGSZ, IMGSZ), dtype=np.float32)
    (out,) = sess.run(None, {"images": x})
    assert [o.name for o in sess.get_outputs()] == ["output0"] and out.shape == (3, N_BOXES, 5 + NC)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(out - want).max() < 1e-2 * max(1.0, np.abs(want).max())
    assert len(adapter.decode({"output0": out})) == 3
    trt_qat.save_quantized(model, tmp_path / "q.pt")  # the architecture is plain data: rebuilt through the adapter
    again, _ = trt_qat.load_quantized(tmp_path / "q.pt")
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(torch.from_numpy(x)), model(torch.from_numpy(x)), atol=1e-4)


def test_cli_calibrate_export_eval_lint_on_a_train_py_checkpoint(code, tiny_digits_yaml, tmp_path,  # noqa: F811
                                                                  capsys):
    _, pt = _train_py_checkpoint(code, tmp_path / "yolov5n.pt", "", nc=10)
    calib, onnx_path = tmp_path / "calib", tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as exit_:  # a pickle: refused until the family is named
        main(["calibrate", "--checkpoint", str(pt), "--data", str(tiny_digits_yaml), "--imgsz", "64", "--out",
              str(calib)])
    assert exit_.value.code == 2 and not calib.exists()
    assert "--model-family yolov5" in capsys.readouterr().err
    # (max: the activations of a randomly initialised YOLOv5n shrink to ~1e-8 by the neck, too little for histograms)
    assert main(["calibrate", "--checkpoint", str(pt), "--model-family", "yolov5", "--data", str(tiny_digits_yaml),
                 "--imgsz", "64", "--method", "max", "--out", str(calib)]) == 0
    assert main(["export", "--checkpoint", str(calib / "quantized.pt"), "--imgsz", "64", "-o", str(onnx_path)]) == 0
    for source in (["--onnx", str(onnx_path)], ["--checkpoint", str(calib / "quantized.pt")]):
        out = tmp_path / f"eval_{source[0][2:]}.json"
        assert main(["eval", *source, "--data", str(tiny_digits_yaml), "--imgsz", "64", "--json", str(out)]) == 0
        row = json.loads(out.read_text())
        assert row["images"] == 6 and 0.0 <= row["map50_95"] <= 1.0
    report = tmp_path / "lint.json"
    main(["lint", str(onnx_path), "--json", str(report)])
    stats = json.loads(report.read_text())["stats"]
    assert stats["weighted_layers"] == stats["int8_layers"] == 60  # every conv in INT8
    assert stats["scale_mismatches"] == stats["requantize_chains"] == stats["reformat_sites"] == 0
    capsys.readouterr()
