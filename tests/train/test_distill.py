"""Distillation QAT: the blocks, the per-block normalisation, the output loss, label-free QAT that opens no label
file, and its bad inputs (one line each)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fixtures_data import tiny_digits_yaml  # noqa: F401  (pytest fixture)
from torch import nn

import trt_qat
from trt_qat.__main__ import main
from trt_qat.config import DistillConfig, QATConfig
from trt_qat.errors import TrtQatError
from trt_qat.models.adapter import get_adapter
from trt_qat.train.distill import check_teacher, distill_blocks, make_distill, teacher_from_student

ADAPTER = get_adapter("builtin")


def _calibrated(imgsz=64):
    torch.manual_seed(0)
    fp32 = ADAPTER.build("yolo-n", nc=10).eval()
    q = trt_qat.quantize(copy.deepcopy(fp32), sample_input=ADAPTER.sample_input(imgsz))
    trt_qat.calibrate(q, [torch.rand(2, 3, imgsz, imgsz) for _ in range(2)], method="max", progress=False)
    return fp32, q


def _train_frozen_bn(model):
    """As QAT trains: train mode, BatchNorm statistics fixed."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _batch(imgsz=64):
    g = torch.Generator().manual_seed(1)
    targets = torch.tensor([[0, 3, 0.5, 0.5, 0.2, 0.3], [1, 7, 0.3, 0.6, 0.1, 0.2]])
    return torch.rand(2, 3, imgsz, imgsz, generator=g), targets, [{}, {}]


def test_blocks_are_the_top_level_children_or_the_named_modules():
    fp32, _ = _calibrated()
    blocks = distill_blocks(fp32)
    assert blocks[0] == "stem" and blocks[-1] == "detect" and "up5" not in blocks  # (no parameters)
    assert distill_blocks(fp32, ["stage2", "sppf"]) == ["stage2", "sppf"]
    with pytest.raises(TrtQatError, match=r"\['nope'\] match no module"):
        distill_blocks(fp32, ["nope"])


def test_the_student_equals_its_teacher_before_training():
    """With quantizers off the student is its teacher: every distillation term is zero, or at its floor for the
    BCE of the objectness/class probabilities."""
    fp32, q = _calibrated()
    teacher = teacher_from_student(q)
    check_teacher(teacher)
    for mode in ("feature", "output"):
        loss, t = make_distill(teacher_from_student(q), ADAPTER, DistillConfig(mode=mode), labels=False,
                               teacher_model=copy.deepcopy(teacher))
        student = _train_frozen_bn(teacher_from_student(q))
        value = loss(student, _batch(), t)
        if mode == "feature":
            assert float(value.detach()) == pytest.approx(0.0, abs=1e-10)
        else:
            value.backward()
            grads = [p.grad.abs().max() for p in student.parameters() if p.grad is not None]
            assert float(max(grads)) < 1e-5  # at its minimum


def test_feature_terms_are_relative_per_block():
    fp32, q = _calibrated()
    loss, teacher = make_distill(q, ADAPTER, DistillConfig(mode="feature"), labels=False,
                                 teacher_model=copy.deepcopy(fp32))
    value = loss(_train_frozen_bn(q), _batch(), teacher)
    value.backward()
    assert 0 < float(value.detach()) < 10 and np.isfinite(float(value.detach()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())


def test_with_labels_the_task_loss_is_mixed_in():
    fp32, q = _calibrated()
    loss, teacher = make_distill(q, ADAPTER, DistillConfig(mode="both", weight=0.5), labels=True,
                                 teacher_model=copy.deepcopy(fp32))
    total = loss(_train_frozen_bn(q), _batch(), teacher)
    task, distill = loss.last_items.tolist()
    assert float(total.detach()) == pytest.approx(task + 0.5 * distill * 2, rel=1e-5)


def test_a_quantized_or_mismatched_teacher_is_refused():
    fp32, q = _calibrated()
    with pytest.raises(TrtQatError, match="teacher is quantized"):
        make_distill(q, ADAPTER, DistillConfig(mode="feature"), teacher_model=copy.deepcopy(q))
    torch.manual_seed(0)
    other = ADAPTER.build("yolo-s", nc=10).eval()
    loss, teacher = make_distill(q, ADAPTER, DistillConfig(mode="feature"), labels=False, teacher_model=other)
    with pytest.raises(TrtQatError, match="same architecture"):
        loss(_train_frozen_bn(q), _batch(), teacher)


def test_finetune_with_a_teacher_trains(tmp_path):
    fp32, q = _calibrated()
    loss, teacher = make_distill(q, ADAPTER, DistillConfig(mode="feature"), labels=False,
                                 teacher_model=copy.deepcopy(fp32))
    before = q.stem.conv.weight.detach().clone()
    res = trt_qat.finetune(q, [_batch(), _batch()], loss, config=QATConfig(epochs=1, lr=1e-3), teacher=teacher,
                           progress=False)
    assert not torch.equal(before, q.stem.conv.weight) and np.isfinite(res["history"][0]["loss"])


def _bare_images(root, n=6):
    """A folder of images with NO usable labels: a label path that is a directory makes any reader fail."""
    from PIL import Image

    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (labels / f"{i}.txt").mkdir()  # reading it as a label file would raise
    return images


def test_label_free_qat_opens_no_label_file(tiny_digits_yaml, tmp_path, capsys):  # noqa: F811
    calib = tmp_path / "calib"
    fp32_path = ADAPTER.save(ADAPTER.build("yolo-n", nc=10), tmp_path / "fp32.pt")
    assert main(["calibrate", "--checkpoint", str(fp32_path), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                 "--out", str(calib)]) == 0
    images = _bare_images(tmp_path / "footage")
    with pytest.raises(TrtQatError, match="is a directory"):  # the trap works: a labelled reader fails on it
        ADAPTER.dataset({"yaml_file": "x", "nc": 10, "names": [str(i) for i in range(10)],
                         "val": str(images)}, "val", imgsz=64)
    assert main(["qat", "--checkpoint", str(calib / "quantized.pt"), "--distill", "feature", "--images",
                 str(images), "--imgsz", "64", "--epochs", "2", "--batch-size", "2", "--lr", "3e-5",
                 "--optimizer", "adamw", "--out", str(tmp_path / "qat")]) == 0
    out = capsys.readouterr().out
    assert "held-out distillation loss" in out and (tmp_path / "qat" / "best.pt").is_file()


@pytest.mark.parametrize("argv, msg", [
    (["--distill", "feature", "--images", "EMPTY"], "no images found"),
    (["--images", "EMPTY"], "needs --distill"),
    ([], "give --data"),
    (["--distill", "feature", "--images", "IMAGES", "--distill-blocks", "nope"], "match no module"),
    (["--distill", "feature", "--images", "IMAGES", "--teacher", "QUANTIZED"], "quantized"),
])
def test_distillation_bad_inputs_are_one_line(tiny_digits_yaml, tmp_path, capsys, argv, msg):  # noqa: F811
    calib = tmp_path / "calib"
    fp32_path = ADAPTER.save(ADAPTER.build("yolo-n", nc=10), tmp_path / "fp32.pt")
    assert main(["calibrate", "--checkpoint", str(fp32_path), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                 "--out", str(calib)]) == 0
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    subs = {"EMPTY": str(tmp_path / "empty"), "IMAGES": str(_bare_images(tmp_path / "f")),
            "QUANTIZED": str(calib / "quantized.pt")}
    argv = [subs.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["qat", "--checkpoint", str(calib / "quantized.pt"), "--imgsz", "64", "--out", str(tmp_path / "q"),
              *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("trt_qat: error:")]  # (besides progress logs)
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err
    assert not (tmp_path / "q").exists()
