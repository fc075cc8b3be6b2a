"""COCO mAP of a detector through any runner (PyTorch, ONNX Runtime, TensorRT).

Every backend goes through the same steps: letterboxed batches from the dataset -> ``runner.infer`` -> the model
family's :meth:`~trt_qat.models.adapter.ModelAdapter.decode` (decoding and NMS) -> boxes mapped back to
original-image pixels -> pycocotools ``COCOeval``. pycocotools is imported lazily.
"""
from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import torch

from trt_qat.errors import LOG, TrtQatError
from trt_qat.runners.base import check_inputs, declared_dims

__all__ = ["evaluate", "predict_dataset", "coco_map"]


def _batches(dataset, batch_size: int, max_images):
    """Yield ``(imgs [B,3,H,W] tensor, metas)`` in dataset order."""
    from trt_qat.data.dataset import build_dataloader

    n = len(dataset) if max_images is None else min(len(dataset), max(int(max_images), 0))
    if n < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(n))
    for imgs, _targets, metas in build_dataloader(dataset, batch_size=batch_size, shuffle=False, workers=0):
        yield imgs, metas


def predict_dataset(runner, dataset, batch_size: int = 16, conf_thres: float = 0.001, iou_thres: float = 0.6,
                    max_images=None, max_det: int = 300, pad_to_batch: bool = False, desc: str | None = None,
                    adapter=None):
    """Run ``runner`` over ``dataset`` and return COCO-style detections in original-image pixels.

    Args:
        runner (BaseRunner): any runner of the model (PyTorch, ONNX Runtime, TensorRT).
        dataset (DetectionDataset): letterboxing dataset with ``(img, labels, meta)`` items.
        batch_size (int): images per inference. Defaults to 16.
        conf_thres (float): NMS score threshold. Defaults to 0.001.
        iou_thres (float): NMS IoU threshold. Defaults to 0.6.
        max_images (int | None): evaluate only the first N images. Defaults to None (all).
        max_det (int): detections kept per image. Defaults to 300.
        pad_to_batch (bool): pad the last batch to ``batch_size`` (for engines built with a fixed batch; a runner
            that declares a fixed batch of ``batch_size`` is always padded). Defaults to False.
        desc (str | None): progress-bar label. Defaults to the runner's name.
        adapter (ModelAdapter | None): the model family, whose ``decode`` turns the runner's outputs into boxes.
            Defaults to the built-in detector's.

    Returns:
        tuple[list[dict], list[int], float]: detections (``image_id``, ``category_id``, ``bbox`` xywh, ``score``),
        the evaluated image ids, and the seconds spent.

    Raises:
        TrtQatError: the runner's declared inputs cannot take the image batches (another rank, size, batch or
            dtype, or more inputs than the one image input), checked before anything runs.
    """
    from tqdm import tqdm

    from trt_qat.models.adapter import get_adapter

    adapter = adapter or get_adapter()
    if int(batch_size) < 1:
        raise TrtQatError(f"batch_size must be >= 1 (got {batch_size})")
    total = len(dataset) if max_images is None else min(len(dataset), max(int(max_images), 0))
    detections, image_ids = [], []
    start = time.perf_counter()
    with runner:
        input_name = runner.input_names[0]
        declared = declared_dims((getattr(runner, "input_shapes", None) or {}).get(input_name, ()))
        pad_to_batch = pad_to_batch or declared[:1] == [int(batch_size)]  # a fixed batch takes only full batches
        if total:  # the first batch's shape, checked before the progress bar and the first inference
            first = (int(batch_size) if pad_to_batch else min(int(batch_size), total),) + tuple(dataset[0][0].shape)
            check_inputs(runner, {input_name: first}, {input_name: np.float32}, what="the evaluation images",
                         hint="evaluation feeds a detector one input of letterboxed float32 images [batch, 3, imgsz, "
                              "imgsz]: pass a detector's model, with --batch-size and --imgsz matching its input")
        # (delay: no bar before the first batch is done, so an error there is the only line on stderr)
        with tqdm(total=total, desc=desc or f"eval {runner.name}", unit="img", leave=False, dynamic_ncols=True,
                  delay=0.5) as bar:
            for imgs, metas in _batches(dataset, int(batch_size), max_images):
                x = imgs.numpy().astype(np.float32, copy=False)
                n = x.shape[0]
                if pad_to_batch and n < batch_size:
                    x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], np.float32)], 0)
                outputs = runner.infer({input_name: x})
                outputs = {name: value[:n] for name, value in outputs.items()}
                for det, meta in zip(adapter.decode(outputs, conf_thres, iou_thres, max_det), metas):
                    image_ids.append(int(meta["image_id"]))
                    detections += _coco_detections(det, meta)
                bar.update(n)
    return detections, image_ids, time.perf_counter() - start


def _coco_detections(det, meta: dict) -> list:
    """COCO detections (xywh in original-image pixels) of one image's decoded ``[n, 6]`` boxes."""
    from trt_qat.data.transforms import scale_boxes_to_original

    if det.shape[0] == 0:
        return []
    det = det.cpu().numpy().astype(np.float64)
    boxes = scale_boxes_to_original(det[:, :4], meta["ratio"], meta["pad"], meta["orig_shape"])
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    return [{"image_id": int(meta["image_id"]), "category_id": int(cls), "bbox": [x1, y1, w, h],
             "score": float(score)}
            for (x1, y1), (w, h), score, cls in zip(boxes[:, :2].tolist(), wh.tolist(), det[:, 4].tolist(),
                                                    det[:, 5].tolist())
            if w > 0 and h > 0]


def _complete_gt(gt: dict) -> dict:
    """Fill the keys pycocotools needs (ids, area, iscrowd, categories) when a ground truth lacks them."""
    gt = dict(gt)
    anns = []
    for k, a in enumerate(gt.get("annotations", []), start=1):
        a = dict(a)
        a.setdefault("id", k)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
        anns.append(a)
    gt["annotations"] = anns
    if not gt.get("categories"):
        cats = sorted({int(a["category_id"]) for a in anns})
        gt["categories"] = [{"id": c, "name": str(c)} for c in cats]
    gt.setdefault("images", [])
    gt.setdefault("info", {})
    return gt


def coco_map(ground_truth: dict, detections: list, image_ids=None) -> tuple[float, float]:
    """COCO bbox mAP@0.5 and mAP@0.5:0.95 with pycocotools (its prints are silenced).

    Args:
        ground_truth (dict): COCO dict (images, annotations with xywh ``bbox``, categories).
        detections (list[dict]): ``image_id``, ``category_id``, ``bbox`` (xywh), ``score``.
        image_ids (Iterable[int] | None): restrict to these images. Defaults to all ground-truth images.

    Returns:
        tuple[float, float]: ``(map50, map50_95)``; 0.0 when there are no detections or no ground truth boxes.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise TrtQatError("pycocotools is not installed; `pip install pycocotools`") from None
    gt = _complete_gt(ground_truth)
    if not detections or not gt["annotations"]:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    map50_95, map50 = float(ev.stats[0]), float(ev.stats[1])
    return max(map50, 0.0), max(map50_95, 0.0)   # -1 means "no ground truth in the selection"


def evaluate(runner, dataset, batch_size: int = 16, conf_thres: float = 0.001, iou_thres: float = 0.6,
             max_images=None, desc: str | None = None, pad_to_batch: bool = False, adapter=None) -> dict:
    """COCO mAP of ``runner`` on ``dataset``.

    Args:
        runner (BaseRunner): any runner of the model (PyTorch, ONNX Runtime, TensorRT).
        dataset (DetectionDataset): e.g. ``YoloDataset(data_yaml, "val")``; must offer ``coco_ground_truth()``.
        batch_size (int): images per inference. Defaults to 16.
        conf_thres (float): NMS score threshold. Defaults to 0.001.
        iou_thres (float): NMS IoU threshold. Defaults to 0.6.
        max_images (int | None): evaluate only the first N images. Defaults to None (all).
        desc (str | None): progress-bar label. Defaults to "eval <runner name>".
        pad_to_batch (bool): pad the last batch to ``batch_size`` (fixed-batch engines). Defaults to False.
        adapter (ModelAdapter | None): the model family (its ``decode``). Defaults to the built-in detector's.

    Returns:
        dict: ``map50``, ``map50_95`` (floats), ``images`` (int), ``detections`` (int), ``seconds`` (float).
    """
    if len(dataset) == 0:
        raise TrtQatError("the evaluation dataset is empty; point it at a split with images")
    detections, image_ids, seconds = predict_dataset(runner, dataset, batch_size, conf_thres, iou_thres,
                                                     max_images=max_images, pad_to_batch=pad_to_batch, desc=desc,
                                                     adapter=adapter)
    map50, map50_95 = coco_map(dataset.coco_ground_truth(), detections, image_ids)
    LOG.debug("evaluate %s: %d images, %d detections, mAP50 %.4f, mAP50-95 %.4f, %.1fs", runner.name,
              len(image_ids), len(detections), map50, map50_95, seconds)
    return {"map50": map50, "map50_95": map50_95, "images": len(image_ids), "detections": len(detections),
            "seconds": seconds}
