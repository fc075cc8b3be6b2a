"""evaluate(): COCO mAP through any runner (oracle, empty, torch), plus a one-epoch training smoke test."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from fixtures_data import tiny_digits_yaml  # noqa: F401  (pytest fixture)

from trt_qat.errors import TrtQatError
from trt_qat.measure.evaluate import coco_map, evaluate
from trt_qat.runners.base import BaseRunner
from trt_qat.runners.torch_runner import TorchRunner

pytest.importorskip("pycocotools")



class OracleRunner(BaseRunner):
    """Returns the ground truth of the images it is fed, in dataset order, as decoded model output."""

    backend = "oracle"

    def __init__(self, dataset, nc, empty=False, jitter=0.0):
        super().__init__()
        self.dataset, self.nc, self.empty, self.jitter = dataset, nc, empty, jitter
        self.next_index = 0

    def input_names_impl(self):
        return ["images"]

    def activate_impl(self):
        self.next_index = 0

    def infer_impl(self, feed_dict):
        x = feed_dict["images"]
        b, _, h, w = x.shape
        out = np.zeros((b, 16, 5 + self.nc), np.float32)
        for k in range(b):
            if not x[k].any():                                 # padding rows (pad_to_batch)
                continue
            img, labels, _meta = self.dataset[self.next_index]
            assert np.array_equal(img.numpy(), x[k])          # evaluate feeds images in dataset order
            self.next_index += 1
            if self.empty:
                continue
            for j, (cls, cx, cy, bw, bh) in enumerate(labels.tolist()):
                out[k, j, :4] = [cx * w + self.jitter * bw * w, cy * h, bw * w, bh * h]
                out[k, j, 4] = 1.0
                out[k, j, 5 + int(cls)] = 0.9
        return OrderedDict(output=out)


@pytest.fixture(scope="module")
def val_ds(tiny_digits_yaml):  # noqa: F811
    from trt_qat.data.yolo import YoloDataset

    return YoloDataset(tiny_digits_yaml, "val", imgsz=128)


def test_oracle_runner_scores_perfect_map(val_ds):
    res = evaluate(OracleRunner(val_ds, val_ds.nc), val_ds, batch_size=4)
    assert res["images"] == len(val_ds)
    assert res["map50"] == pytest.approx(1.0)
    assert res["map50_95"] > 0.95             # boxes round-trip through letterbox + back to original pixels
    assert res["seconds"] >= 0 and res["detections"] == sum(len(val_ds[i][1]) for i in range(len(val_ds)))


def test_shifted_oracle_loses_map50_95_but_not_map50(val_ds):
    res = evaluate(OracleRunner(val_ds, val_ds.nc, jitter=0.15), val_ds, batch_size=5)
    assert res["map50"] == pytest.approx(1.0)
    assert res["map50_95"] < 0.9


def test_no_detections_gives_zero(val_ds):
    res = evaluate(OracleRunner(val_ds, val_ds.nc, empty=True), val_ds, batch_size=4)
    assert res == {**res, "map50": 0.0, "map50_95": 0.0, "detections": 0, "images": len(val_ds)}


def test_max_images_and_pad_to_batch(val_ds):
    runner = OracleRunner(val_ds, val_ds.nc)
    res = evaluate(runner, val_ds, batch_size=4, max_images=3, pad_to_batch=True)
    assert res["images"] == 3 and res["map50"] == pytest.approx(1.0) and runner.next_index == 3


def test_torch_runner_untrained_model(val_ds):
    from trt_qat.models.yolo import build_model

    model = build_model("yolo-n", nc=val_ds.nc).train()
    runner = TorchRunner(model)
    with runner:
        out = runner.infer({"images": np.zeros((2, 3, 128, 128), np.float32)})
    assert list(out) == ["output"] and out["output"].shape == (2, 1008, 15) and out["output"].dtype == np.float32
    assert model.training                      # the runner restores the training mode on exit
    res = evaluate(runner, val_ds, batch_size=3)
    assert 0.0 <= res["map50"] < 0.5 and 0.0 <= res["map50_95"] <= res["map50"]
    with pytest.raises(TrtQatError, match="not active"):
        runner.infer(np.zeros((1, 3, 128, 128), np.float32))


def test_coco_map_edge_cases():
    gt = {"images": [{"id": 0, "width": 100, "height": 100}], "annotations": [],
          "categories": [{"id": 0, "name": "0"}]}
    det = [{"image_id": 0, "category_id": 0, "bbox": [1, 1, 10, 10], "score": 0.9}]
    assert coco_map(gt, det) == (0.0, 0.0)
    gt["annotations"] = [{"image_id": 0, "category_id": 0, "bbox": [1, 1, 10, 10]}]   # no id/area/iscrowd
    assert coco_map(gt, det) == (pytest.approx(1.0), pytest.approx(1.0))
    assert coco_map(gt, []) == (0.0, 0.0)


def test_train_fp32_one_epoch_writes_a_loadable_checkpoint(tiny_digits_yaml, tmp_path):  # noqa: F811
    from trt_qat.models.yolo import load_checkpoint
    from trt_qat.train.fp32 import train_fp32

    out = tmp_path / "fp32" / "best.pt"
    res = train_fp32(tiny_digits_yaml, epochs=1, batch_size=4, out=out, seed=0)
    assert out.is_file() and res["checkpoint"] == str(out) and res["best_epoch"] == 1
    assert len(res["history"]) == 1 and np.isfinite(res["history"][0]["loss"])
    model, ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == 1 and ckpt["train_args"]["model"] == "yolo-n" and model.cfg["nc"] == 10
