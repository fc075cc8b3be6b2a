"""Tests of trt_qat.data: digits-det generator, letterbox, YOLO and COCO datasets, and every bad input."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from trt_qat.cli.make_data import main as make_data_main
from trt_qat.data.coco import CocoDataset
from trt_qat.data.dataset import build_dataloader, collate_fn
from trt_qat.data.digits_det import generate_digits_det
from trt_qat.data.transforms import letterbox, scale_boxes_to_original, xywhn_to_xyxy
from trt_qat.data.yolo import YoloDataset, label_path_for, load_data_yaml, write_image_list
from trt_qat.errors import TrtQatError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fixtures_data, under any pytest import mode
from fixtures_data import TINY_DIGITS, make_tiny_digits  # noqa: E402


@pytest.fixture(scope="module")
def tiny_digits_yaml(tmp_path_factory):
    return make_tiny_digits(tmp_path_factory)


def _read_labels(path: Path) -> np.ndarray:
    return np.loadtxt(path, ndmin=2).reshape(-1, 5)


def _make_split(root: Path, split: str, n: int, labels: dict | None = None, size=(40, 60)) -> Path:
    """A hand-made YOLO split with n grey images of size (h, w); returns the images dir."""
    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((*size, 3), 100 + i, np.uint8)).save(img_dir / f"{i:03d}.png")
        text = (labels or {}).get(i, "0 0.5 0.5 0.2 0.2\n")
        if text is not None:
            (lbl_dir / f"{i:03d}.txt").write_text(text)
    return img_dir


def _write_yaml(root: Path, **doc) -> Path:
    doc.setdefault("path", str(root))
    doc.setdefault("nc", 3)
    doc.setdefault("names", ["a", "b", "c"])
    (root / "data.yaml").write_text(yaml.safe_dump(doc))
    return root / "data.yaml"


# ------------------------------------------------------------------------------------------------------- generator
def test_generator_layout_and_yaml(tiny_digits_yaml):
    root = tiny_digits_yaml.parent
    doc = yaml.safe_load(tiny_digits_yaml.read_text())
    assert doc["path"] == str(root) and Path(doc["path"]).is_absolute()
    assert (doc["train"], doc["val"], doc["calib"]) == ("images/train", "images/val", "images/calib")
    assert doc["nc"] == 10 and doc["names"] == [str(i) for i in range(10)]
    assert doc["generator"]["seed"] == 0 and doc["generator"]["n_train"] == TINY_DIGITS["n_train"]
    for split in ("train", "val", "calib"):
        images = sorted((root / "images" / split).glob("*.png"))
        assert [p.name for p in images] == [f"{i:05d}.png" for i in range(TINY_DIGITS[f"n_{split}"])]
        for p in images:
            assert label_path_for(p) == root / "labels" / split / (p.stem + ".txt")
            assert label_path_for(p).is_file()
    assert not list(root.parent.glob(".*.tmp")), "temporary generation dir left behind"


def test_generator_boxes_valid(tiny_digits_yaml):
    root = tiny_digits_yaml.parent
    n_boxes = 0
    for img_path in sorted((root / "images").rglob("*.png")):
        img = np.asarray(Image.open(img_path))
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and img.shape[2] == 3 and 96 <= h <= 160 and 96 <= w <= 160
        text = label_path_for(img_path).read_text()
        for line in text.splitlines():
            cls, cx, cy, bw, bh = line.split()
            assert all(len(v.split(".")[1]) == 6 for v in (cx, cy, bw, bh))  # 6 decimals
        labels = _read_labels(label_path_for(img_path))
        assert 1 <= len(labels) <= 4
        assert set(labels[:, 0].tolist()) <= set(range(10))
        boxes = xywhn_to_xyxy(labels[:, 1:], w, h)
        assert (boxes[:, :2] >= -1e-3).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 3).all()
        # the box holds the digit: its border rows/cols differ from the plain background more than far pixels
        for x0, y0, x1, y1 in np.round(boxes).astype(int):
            inside = img[y0:y1, x0:x1].astype(np.float32)
            assert inside.std() > 8.0
        n_boxes += len(labels)
    assert n_boxes >= sum(TINY_DIGITS[k] for k in ("n_train", "n_val", "n_calib"))


def test_generator_deterministic_and_reused(tmp_path, tiny_digits_yaml, caplog):
    other = generate_digits_det(tmp_path / "again", **TINY_DIGITS)
    a, b = tiny_digits_yaml.parent, other.parent
    for rel in ("labels/train/00003.txt", "labels/val/00001.txt"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    for rel in ("images/train/00003.png", "images/calib/00002.png"):
        assert np.array_equal(np.asarray(Image.open(a / rel)), np.asarray(Image.open(b / rel)))
    # a different seed gives different data
    third = generate_digits_det(tmp_path / "seed1", **{**TINY_DIGITS, "seed": 1})
    assert (third.parent / "labels/train/00003.txt").read_bytes() != (a / "labels/train/00003.txt").read_bytes()
    # same params: skipped (files untouched); other params: replaced atomically
    mtime = (b / "images/train/00000.png").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="trt_qat"):
        assert generate_digits_det(tmp_path / "again", **TINY_DIGITS) == other
    assert (b / "images/train/00000.png").stat().st_mtime_ns == mtime
    assert "reusing" in caplog.text
    generate_digits_det(tmp_path / "again", **{**TINY_DIGITS, "n_train": 3})
    assert len(list((b / "images/train").glob("*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "seed1"]


def test_generator_refuses_foreign_dir_and_bad_args(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(TrtQatError, match="refusing to overwrite"):
        generate_digits_det(tmp_path / "mine", n_train=1, n_val=0, n_calib=0)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "x"
    with pytest.raises(TrtQatError, match="min_canvas"):
        generate_digits_det(tmp_path / "x", n_train=1, min_canvas=200, max_canvas=100)


def test_generator_val_uses_other_scans():
    from trt_qat.data.digits_det import _digit_scans

    images, labels, train_idx, val_idx = _digit_scans()
    assert len(images) == 1797 and not set(train_idx) & set(val_idx)
    assert len(val_idx) == pytest.approx(0.2 * 1797, abs=2)
    assert set(labels[val_idx].tolist()) == set(range(10))


def test_make_data_cli(tmp_path, capsys):
    assert make_data_main(["--out", str(tmp_path / "d"), "--n-train", "2", "--n-val", "1", "--n-calib", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "train 2 images" in out[0] and "data.yaml" in out[0]
    with pytest.raises(SystemExit) as exc:
        make_data_main(["--out", str(tmp_path / "e"), "--n-train", "-1"])
    assert exc.value.code == 2
    assert "n_train must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("shape,new_shape", [((100, 160), 128), ((160, 96), 128), ((50, 70), 128),
                                             ((128, 128), 128), ((90, 200), (96, 160))])
def test_letterbox_round_trip(shape, new_shape):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(*shape, 3), dtype=np.uint8)
    out, ratio, (pw, ph) = letterbox(img, new_shape)
    oh, ow = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    assert out.shape == (oh, ow, 3) and out.dtype == np.uint8
    # padding is centred, 114 grey, and the image fills one side fully
    assert pw == 0 or ph == 0
    if pw >= 1:
        assert (out[:, 0] == 114).all() and (out[:, -1] == 114).all()
    if ph >= 1:
        assert (out[0] == 114).all() and (out[-1] == 114).all()
    rw, rh = ratio  # the scale each axis really got: the resized image is exactly w * rw by h * rh pixels
    assert abs(shape[1] * rw + 2 * pw - ow) <= 1.0 and abs(shape[0] * rh + 2 * ph - oh) <= 1.0
    assert float(shape[1] * rw).is_integer() or abs(shape[1] * rw - round(shape[1] * rw)) < 1e-9
    assert ow - 2 * pw - shape[1] * rw in (0.0, 1.0) and oh - 2 * ph - shape[0] * rh in (0.0, 1.0)
    boxes = np.array([[3.0, 5.0, 40.0, 30.0], [0.0, 0.0, shape[1], shape[0]], [10.5, 7.25, 20.0, 49.0]])
    boxes = np.minimum(boxes, [shape[1], shape[0], shape[1], shape[0]])
    lb = boxes * np.array([rw, rh, rw, rh]) + np.array([pw, ph, pw, ph])
    assert (lb >= -1e-6).all() and (lb[:, [0, 2]] <= ow + 1e-6).all() and (lb[:, [1, 3]] <= oh + 1e-6).all()
    back = scale_boxes_to_original(lb, ratio, (pw, ph), shape)
    assert np.abs(back - boxes).max() <= 1e-9  # exact: each axis is divided by the scale it got
    back_t = scale_boxes_to_original(torch.tensor(lb, dtype=torch.float32), ratio, (pw, ph), shape)
    assert isinstance(back_t, torch.Tensor) and torch.allclose(back_t.double(), torch.tensor(back), atol=1e-3)


def test_scale_boxes_clips():
    boxes = np.array([[-10.0, -10.0, 500.0, 500.0]])
    out = scale_boxes_to_original(boxes, 0.5, (4.0, 0.0), (100, 120))
    assert out.tolist() == [[0.0, 0.0, 120.0, 100.0]]
    assert boxes[0, 0] == -10.0  # input untouched
    assert scale_boxes_to_original(np.zeros((0, 4)), 1.0, (0, 0), (10, 10)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------------- YoloDataset
def test_load_data_yaml_resolves_paths(tiny_digits_yaml, tmp_path):
    cfg = load_data_yaml(tiny_digits_yaml)
    root = tiny_digits_yaml.parent
    assert cfg["nc"] == 10 and cfg["val"] == str(root / "images" / "val") and cfg["path"] == str(root)
    # no `path` key: relative to the yaml's directory; names as a mapping
    _make_split(tmp_path, "val", 1)
    (tmp_path / "d.yaml").write_text("val: images/val\nnames: {0: a, 1: b}\n")
    cfg = load_data_yaml(tmp_path / "d.yaml")
    assert cfg["val"] == str(tmp_path / "images" / "val") and cfg["nc"] == 2 and cfg["names"] == ["a", "b"]


def test_dataset_items_and_ground_truth(tiny_digits_yaml):
    ds = YoloDataset(tiny_digits_yaml, split="val", imgsz=128)
    assert len(ds) == TINY_DIGITS["n_val"] and ds.nc == 10 and ds.names[3] == "3" and ds.imgsz == 128
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds.image_paths) == len(ds)
    gt = ds.coco_ground_truth()
    assert [c["id"] for c in gt["categories"]] == list(range(10))
    assert [im["id"] for im in gt["images"]] == list(range(len(ds)))
    for i in range(len(ds)):
        img, labels, meta = ds[i]
        assert img.shape == (3, 128, 128) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        assert labels.dtype == torch.float32 and labels.shape[1] == 5 and len(labels) >= 1
        assert meta["image_id"] == i and meta["path"] == str(ds.image_paths[i])
        orig = np.asarray(Image.open(meta["path"]))
        assert meta["orig_shape"] == orig.shape[:2] == (gt["images"][i]["height"], gt["images"][i]["width"])
        # labels -> letterboxed pixels -> original pixels == label file in pixels, == coco gt
        h, w = meta["orig_shape"]
        truth = _read_labels(label_path_for(meta["path"]))
        truth_px = xywhn_to_xyxy(truth[:, 1:], w, h)
        lb_px = xywhn_to_xyxy(labels[:, 1:].numpy(), 128, 128)
        back = scale_boxes_to_original(lb_px, meta["ratio"], meta["pad"], meta["orig_shape"])
        assert np.abs(back - truth_px).max() <= 1.0
        assert labels[:, 0].tolist() == truth[:, 0].tolist()
        anns = [a for a in gt["annotations"] if a["image_id"] == i]
        gt_xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)])
        assert np.abs(gt_xyxy - truth_px).max() < 1e-3
        assert [a["category_id"] for a in anns] == truth[:, 0].astype(int).tolist()
        assert all(a["iscrowd"] == 0 and a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) for a in anns)
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])


def test_ground_truth_loads_in_pycocotools(tiny_digits_yaml):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = YoloDataset(tiny_digits_yaml, split="val").coco_ground_truth()
    coco.createIndex()
    assert len(coco.getImgIds()) == TINY_DIGITS["n_val"] and len(coco.getCatIds()) == 10


def test_dataloader_and_collate(tiny_digits_yaml):
    ds = YoloDataset(tiny_digits_yaml, split="train", imgsz=96)
    batches = list(build_dataloader(ds, batch_size=3, shuffle=False))
    assert [b[0].shape[0] for b in batches] == [3, 3, 2]
    imgs, targets, metas = batches[1]
    assert imgs.shape == (3, 3, 96, 96) and imgs.dtype == torch.float32
    assert targets.shape[1] == 6 and targets.dtype == torch.float32
    assert [m["image_id"] for m in metas] == [3, 4, 5]
    for b in range(3):
        rows = targets[targets[:, 0] == b]
        assert torch.equal(rows[:, 1:], ds[3 + b][1])
    assert len(list(build_dataloader(ds, batch_size=3, drop_last=True))) == 2
    # an image without objects collates to no rows
    empty = (torch.zeros(3, 8, 8), torch.zeros(0, 5), {})
    _, t, _ = collate_fn([empty, (torch.zeros(3, 8, 8), torch.ones(2, 5), {})])
    assert t.shape == (2, 6) and t[:, 0].tolist() == [1.0, 1.0]


def test_augment_keeps_labels_on_digits(tiny_digits_yaml):
    ds = YoloDataset(tiny_digits_yaml, split="train", imgsz=128, augment=True, max_images=4)
    plain = YoloDataset(tiny_digits_yaml, split="train", imgsz=128, max_images=4)
    assert len(ds) == 4
    torch.manual_seed(0)
    for i in range(len(ds)):
        img, labels, _ = ds[i]
        assert img.shape == (3, 128, 128) and labels.shape[1] == 5
        assert len(labels) <= len(plain[i][1])
        xyxy = xywhn_to_xyxy(labels[:, 1:].numpy(), 128, 128)
        assert (xyxy >= -1e-4).all() and (xyxy <= 128 + 1e-4).all()
        for x0, y0, x1, y1 in np.round(xyxy).astype(int):  # a digit is still inside each box
            assert img[:, y0:y1, x0:x1].std() > 0.03


def test_image_list_split(tiny_digits_yaml, tmp_path):
    root = tiny_digits_yaml.parent
    chosen = sorted((root / "images" / "train").glob("*.png"))[:3]
    txt = write_image_list(chosen, tmp_path / "calib" / "run1" / "images.txt")
    assert txt.read_text().splitlines() == [str(p.absolute()) for p in chosen]
    cfg = dict(load_data_yaml(tiny_digits_yaml))
    cfg["calib"] = str(txt)
    ds = YoloDataset(cfg, split="calib")
    assert [Path(p) for p in ds.image_paths] == chosen and ds.labels[0].shape[1] == 5


# -------------------------------------------------------------------------------------------------- bad inputs
def test_missing_data_yaml(tmp_path):
    with pytest.raises(TrtQatError) as exc:
        YoloDataset(tmp_path / "nope.yaml")
    msg = str(exc.value)
    assert "nope.yaml' does not exist" in msg and "trt-qat make-data" in msg and "\n" not in msg


def test_missing_keys_named(tmp_path):
    (tmp_path / "a.yaml").write_text("train: images/train\nval: images/val\n")
    with pytest.raises(TrtQatError, match="`nc`"):
        load_data_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("train: images/train\nnc: 2\n")
    with pytest.raises(TrtQatError, match="no `val` split"):
        YoloDataset(tmp_path / "b.yaml", split="val")
    (tmp_path / "c.yaml").write_text("nc: 2\nnames: [a, b, c]\nval: x\n")
    with pytest.raises(TrtQatError, match="`names` has 3"):
        load_data_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("val: [unclosed\n")
    with pytest.raises(TrtQatError, match="not valid YAML"):
        load_data_yaml(tmp_path / "d.yaml")


def test_missing_split_dir(tmp_path):
    cfg = _write_yaml(tmp_path, val="images/val")
    with pytest.raises(TrtQatError, match=r"split '.*images/val' does not exist"):
        YoloDataset(cfg, split="val")


def test_empty_split(tmp_path):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "images" / "val" / "notes.md").write_text("no images here")
    cfg = _write_yaml(tmp_path, val="images/val")
    with pytest.raises(TrtQatError, match="no images found in '.*images/val'"):
        YoloDataset(cfg, split="val")


def test_malformed_label_lines_skipped_with_one_warning(tmp_path, caplog):
    labels = {
        0: "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n",             # 1 good, 1 wrong column count
        1: "2 0.3 0.3 0.1 0.1\nx 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n",  # non-numeric, class out of range
        2: "0 0.5 0.5 0.0 0.2\n1 1.2 0.5 0.2 0.2\n1 0.995 0.5 0.02 0.2\n\n",  # w=0, outside, within 1% (kept)
        3: None,                                               # no label file: no objects
        4: "1.5 0.5 0.5 0.2 0.2\n",                            # non-integer class
    }
    _make_split(tmp_path, "train", 5, labels)
    cfg = _write_yaml(tmp_path, train="images/train")
    with caplog.at_level(logging.WARNING, logger="trt_qat"):
        ds = YoloDataset(cfg, split="train")
    assert len(ds) == 5
    assert [len(lb) for lb in ds.labels] == [1, 1, 1, 0, 0]
    assert ds.labels[2][0, 1] + ds.labels[2][0, 3] / 2 <= 1.0 + 1e-6  # clipped into the image
    warnings = [r for r in caplog.records if r.name == "trt_qat" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "skipped 6 malformed label lines in 4 files" in msg and "000.txt:2" in msg
    assert ds[3][1].shape == (0, 5)


def test_corrupt_image_skipped_with_warning(tmp_path, caplog):
    img_dir = _make_split(tmp_path, "val", 3)
    (img_dir / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    data = (img_dir / "002.png").read_bytes()
    (img_dir / "002.png").write_bytes(data[: len(data) // 2])  # truncated
    cfg = _write_yaml(tmp_path, val="images/val")
    with caplog.at_level(logging.WARNING, logger="trt_qat"):
        ds = YoloDataset(cfg, split="val")
    assert [p.name for p in ds.image_paths] == ["000.png"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "trt_qat" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 unreadable images" in warnings[0] and "001.png" in warnings[0]
    # all images corrupt -> nothing usable -> error
    (img_dir / "000.png").write_bytes(b"garbage")
    with pytest.raises(TrtQatError, match="no images found"):
        YoloDataset(cfg, split="val")


def test_missing_listed_images_warned(tmp_path, caplog):
    img_dir = _make_split(tmp_path, "val", 2)
    txt = write_image_list([img_dir / "000.png", img_dir / "gone.png", img_dir / "001.png"], tmp_path / "l.txt")
    cfg = _write_yaml(tmp_path, val=str(txt))
    with caplog.at_level(logging.WARNING, logger="trt_qat"):
        ds = YoloDataset(cfg, split="val")
    assert len(ds) == 2 and "skipped 1 missing image" in caplog.text and "gone.png" in caplog.text


# ---------------------------------------------------------------------------------------------------- CocoDataset
def _tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(img_dir / "a.png")
    Image.fromarray(np.full((100, 50, 3), 30, np.uint8)).save(img_dir / "b.png")
    doc = {
        "images": [{"id": 42, "file_name": "a.png", "height": 60, "width": 80},
                   {"id": 7, "file_name": "b.png", "height": 100, "width": 50}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 18, "bbox": [10, 20, 30, 15], "area": 450, "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 3, "bbox": [0, 0, 80, 60], "area": 4800, "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [5, 50, 20, 40], "area": 800, "iscrowd": 0},
        ],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(doc))
    return ann, img_dir


def test_coco_dataset(tmp_path):
    ann, img_dir = _tiny_coco(tmp_path)
    ds = CocoDataset(ann, img_dir, imgsz=64)
    assert ds.nc == 2 and ds.names == ["car", "dog"] and ds.class_to_category_id == [3, 18]
    assert len(ds) == 2 and ds.coco_image_ids == [42, 7]
    img, labels, meta = ds[0]
    assert img.shape == (3, 64, 64) and meta["orig_shape"] == (60, 80)
    assert labels.shape == (1, 5) and meta["ratio"] == pytest.approx((0.8, 0.8)) and meta["pad"] == (0.0, 8.0)
    assert labels[0].tolist() == pytest.approx([1.0, 25 * 0.8 / 64, (27.5 * 0.8 + 8) / 64, 30 * 0.8 / 64,
                                                15 * 0.8 / 64], abs=1e-5)
    gt = ds.coco_ground_truth()
    assert [c["id"] for c in gt["categories"]] == [0, 1] and [c["name"] for c in gt["categories"]] == ["car", "dog"]
    assert [(a["image_id"], a["category_id"]) for a in gt["annotations"]] == [(0, 1), (1, 0)]  # crowd dropped
    assert gt["annotations"][0]["bbox"] == pytest.approx([10, 20, 30, 15], abs=1e-4)
    assert gt["annotations"][1]["bbox"] == pytest.approx([5, 50, 20, 40], abs=1e-4)
    assert [(im["height"], im["width"]) for im in gt["images"]] == [(60, 80), (100, 50)]
    imgs, targets, _ = collate_fn([ds[0], ds[1]])
    assert imgs.shape == (2, 3, 64, 64) and targets[:, :2].tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_coco_bad_inputs(tmp_path, caplog):
    ann, img_dir = _tiny_coco(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TrtQatError) as exc:
        CocoDataset(bad, img_dir)
    assert "is not valid JSON" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(TrtQatError, match="does not exist"):
        CocoDataset(tmp_path / "missing.json", img_dir)
    (tmp_path / "nolist.json").write_text(json.dumps({"images": []}))
    with pytest.raises(TrtQatError, match="categories"):
        CocoDataset(tmp_path / "nolist.json", img_dir)
    (img_dir / "b.png").unlink()
    doc = json.loads(ann.read_text())
    doc["annotations"].append({"id": 9, "image_id": 42, "category_id": 99, "bbox": [1, 1, 2, 2]})
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="trt_qat"):
        ds = CocoDataset(ann, img_dir)
    assert len(ds) == 1 and len(ds.labels[0]) == 1
    assert "skipped 1 malformed annotation" in caplog.text and "skipped 1 image" in caplog.text
