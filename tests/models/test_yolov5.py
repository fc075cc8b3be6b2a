"""Classic YOLOv5 adapter, without the ultralytics/yolov5 code: a checkpoint recognised from its pickle's names
(a stream written opcode by opcode here, never unpickled), refused until the family is named, one line saying how to
make the code importable, decode + NMS, image-size checks. With the code: tests/models/test_yolov5_code.py."""
from __future__ import annotations

import importlib.abc
import sys
import zipfile

import numpy as np
import pytest
import torch

from trt_qat.errors import TrtQatError
from trt_qat.fileio import pickle_globals
from trt_qat.models.adapter import (
    adapter_for_checkpoint,
    family_of_pickle,
    get_adapter,
    load_fp32,
    read_checkpoint_or_name_family,
)

YOLOV5 = (("models.yolo", "DetectionModel"), ("models.yolo", "Detect"), ("models.common", "Conv"))


def _pickle_stream(globals_) -> bytes:
    """Protocol-2 opcodes for ``{"model": <first class>(), "ema": None, "epoch": -1}``, the model holding one
    instance of every other class as a child (``_modules``), as ``torch.save`` of yolov5's ``train.py`` names
    them."""
    def text(s):
        raw = s.encode()
        return b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE

    def instance(module, name):
        return b"c" + f"{module}\n{name}\n".encode() + b")\x81"  # GLOBAL, EMPTY_TUPLE, NEWOBJ

    (top, *children) = globals_
    children_dict = b"}(" + b"".join(text(str(i)) + instance(*g) for i, g in enumerate(children)) + b"u"
    model = instance(*top) + b"}(" + text("_modules") + children_dict + b"ub"  # state dict, BUILD
    body = b"}(" + text("model") + model + text("ema") + b"N" + text("epoch") + b"J\xff\xff\xff\xff" + b"u"
    return b"\x80\x02" + body + b"."


def _write_pt(path, globals_=YOLOV5):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", _pickle_stream(globals_))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return path


class _BlockYolov5(importlib.abc.MetaPathFinder):
    """Makes the yolov5 code unimportable (a clone's ``models``/``utils``, the ``yolov5`` package)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("models", "utils", "yolov5"):
            raise ModuleNotFoundError(f"No module named '{name}' (blocked for this test)", name=name)
        return None


@pytest.fixture
def no_yolov5_code(monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] in ("models", "utils", "yolov5")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockYolov5(), *sys.meta_path])


@pytest.fixture(scope="module")
def adapter():
    return get_adapter("yolov5")


def test_handwritten_checkpoint_is_recognised_without_unpickling(adapter, tmp_path):
    path = _write_pt(tmp_path / "yolov5s.pt")
    assert {"models.yolo DetectionModel", "models.yolo Detect", "models.common Conv"} <= set(pickle_globals(path))
    assert family_of_pickle(path) == "yolov5"
    pip_trained = [(f"yolov5.{m}", n) for m, n in YOLOV5]  # the PyPI package's train.py names its own modules
    assert family_of_pickle(_write_pt(tmp_path / "pip.pt", pip_trained)) == "yolov5"
    legacy = [("models.yolo", "Model"), ("models.yolo", "Detect"), ("models.common", "Focus")]  # before v6
    assert family_of_pickle(_write_pt(tmp_path / "v4.pt", legacy)) == "yolov5"
    others = {"yolov7.pt": [("models.yolo", "Model"), ("models.yolo", "IDetect"), ("models.common", "Conv")],
              "seg.pt": [("models.yolo", "SegmentationModel"), ("models.yolo", "Segment")],
              "yolov5nu.pt": [("ultralytics.nn.tasks", "DetectionModel"), ("ultralytics.nn.modules.head", "Detect")]}
    found = {name: family_of_pickle(_write_pt(tmp_path / name, g)) for name, g in others.items()}
    assert found == {"yolov7.pt": None, "seg.pt": None, "yolov5nu.pt": "ultralytics"}


def test_pickle_is_refused_until_the_family_is_named(adapter, tmp_path):
    path = _write_pt(tmp_path / "yolov5s.pt")
    with pytest.raises(TrtQatError, match="is a yolov5 checkpoint") as err:
        read_checkpoint_or_name_family(path)
    assert "--model-family yolov5" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TrtQatError, match="--model-family yolov5"):
        load_fp32(path)


def test_missing_code_is_one_line_saying_how_to_get_it(adapter, tmp_path, no_yolov5_code):
    assert adapter.recognizes({"model_family": "yolov5"}) and not adapter.recognizes({"model": None, "ema": None})
    assert adapter_for_checkpoint({"model_family": "yolov5"}) is adapter
    path = _write_pt(tmp_path / "yolov5s.pt")
    for call in (lambda: adapter.build("yolov5n.yaml", 3), lambda: load_fp32(path, family="yolov5"),
                 lambda: adapter.from_architecture({"yaml": {"nc": 3}, "nc": 3})):
        with pytest.raises(TrtQatError) as err:
            call()
        message = str(err.value)
        assert "pip install yolov5" in message and "PYTHONPATH" in message and "\n" not in message
    assert not any(n.split(".")[0] in ("models", "yolov5") for n in sys.modules)


def test_bad_inputs_need_no_code(adapter, no_yolov5_code):
    with pytest.raises(TrtQatError, match="holds no YOLOv5 model"):
        adapter.from_checkpoint({"epoch": 1}, "x.pt")
    with pytest.raises(TrtQatError, match="quantized"):
        adapter.from_checkpoint({"format": "trt_qat.quantized/1"}, "q.pt")
    with pytest.raises(TrtQatError, match="not a yolov5 model description"):
        adapter.from_architecture({"nc": 3})
    with pytest.raises(TrtQatError, match="multiple of 32"):
        adapter.sample_input(70)
    assert tuple(adapter.sample_input(64, batch=2).shape) == (2, 3, 64, 64)


def test_decode_scores_objectness_times_class_and_runs_class_aware_nms(adapter):
    pred = torch.zeros(1, 4, 5 + 3)
    pred[0, :, :4] = torch.tensor([[20, 21, 10, 20], [20, 20, 10, 20], [20, 21, 10, 20], [30, 30, 30, 30]]).float()
    pred[0, 0, 4:] = torch.tensor([0.9, 1.0, 0.0, 0.0])  # box 0: class 0, score 0.9
    pred[0, 1, 4:] = torch.tensor([0.8, 1.0, 0.0, 0.0])  # box 1: class 0, overlaps box 0 -> suppressed
    pred[0, 2, 4:] = torch.tensor([0.5, 0.0, 0.2, 0.7])  # box 0 again, class 2, score 0.35 -> kept
    pred[0, 3, 4:] = torch.tensor([0.9, 0.0005, 0.0, 0.0])  # score below conf_thres
    (det,) = adapter.decode({"output0": pred.numpy()}, conf_thres=0.001, iou_thres=0.5)
    assert det.shape == (2, 6)
    assert torch.allclose(det[0], torch.tensor([15.0, 11.0, 25.0, 31.0, 0.9, 0.0]))
    assert torch.allclose(det[1], torch.tensor([15.0, 11.0, 25.0, 31.0, 0.35, 2.0]))
    assert adapter.decode({"output0": pred}, max_det=1)[0].shape == (1, 6)
    assert adapter.decode({"output0": np.zeros((2, 0, 8), np.float32)})[1].shape == (0, 6)
    with pytest.raises(TrtQatError, match="first output has shape"):
        adapter.decode({"output0": np.zeros((2, 3))})
