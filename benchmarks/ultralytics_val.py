"""Our evaluator against Ultralytics' own validator (``model.val()``), on the same FP32 weights, split and image size.

trt_qat scores every backend with one path: square letterbox to ``imgsz``, the family's decode, class-aware NMS
(torchvision), COCO mAP by pycocotools. Ultralytics' validator letterboxes each batch to its own rectangle
(``rect``, the batch's aspect ratio rounded up to the stride), runs its own NMS and computes mAP with its own
101-point interpolation. This script runs both on one checkpoint and prints the two mAPs and their difference, then
the same with Ultralytics forced to square batches where its API allows it, then a decomposition: each step of our
path (metric, pre-processing, NMS) replaced by Ultralytics' one at a time,
and Ultralytics' own ``predictions.json`` scored by our pycocotools path, so the difference can be attributed.

    python benchmarks/ultralytics_val.py --checkpoint weights/yolov8n_digits-det.pt \
        --data datasets/digits-det/data.yaml [--imgsz 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trt_qat.errors import setup_logging  # noqa: E402


def _items(dataset):
    """``(img [3,H,W] float in 0..1, meta)`` of every image of a trt_qat dataset, in order."""
    return [dataset[i][0::2] for i in range(len(dataset))]


def _ultralytics_items(data: str, imgsz: int, index_of: dict):
    """The same images pre-processed by Ultralytics' own val dataset (cv2 read, long side resized to ``imgsz`` with
    ``ceil``, cv2 INTER_LINEAR, square LetterBox, pad 114), ordered like trt_qat's, with its ``ratio_pad``."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg_data = check_det_dataset(data)
    cfg = get_cfg(overrides={"imgsz": imgsz, "rect": False, "task": "detect", "mode": "val", "workers": 0})
    uds = build_yolo_dataset(cfg, cfg_data["val"], 16, cfg_data, mode="val", rect=False, stride=32)
    items = [None] * len(index_of)
    for j in range(len(uds)):
        it = uds[j]
        items[index_of[Path(it["im_file"]).name]] = (it["img"].float() / 255, it)
    return items


def _detect(model, items, decode, to_orig, batch: int) -> list:
    """Per image ``(boxes xyxy in original pixels, scores, classes)``: the FP32 model on ``items`` through
    ``decode`` (our adapter's, or Ultralytics' NMS), boxes mapped back by ``to_orig(boxes, meta)``."""
    from trt_qat.runners.torch_runner import TorchRunner

    out = []
    with TorchRunner(model) as runner:
        name = runner.input_names[0]
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            outputs = runner.infer({name: torch.stack([x for x, _ in chunk]).numpy()})
            for det, (_, meta) in zip(decode(outputs), chunk):
                det = det.cpu().double()
                out.append((to_orig(det[:, :4], meta), det[:, 4], det[:, 5]))
    return out


def _coco_dets(dets) -> list:
    return [{"image_id": i, "category_id": int(c), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
            for i, (boxes, scores, cls) in enumerate(dets)
            for b, s, c in zip(boxes.tolist(), scores.tolist(), cls.tolist()) if b[2] > b[0] and b[3] > b[1]]


def _pycoco(gt: dict, dets) -> tuple:
    from trt_qat.measure.evaluate import coco_map

    return coco_map(gt, _coco_dets(dets), range(len(gt["images"])))


def _ap_per_class(gt: dict, dets) -> tuple:
    """Ultralytics' metric (``match_predictions`` at IoU 0.5:0.95 + ``ap_per_class``, 101-point interpolation,
    every detection) on the same detections, IoU in original-image pixels."""
    from types import SimpleNamespace

    import numpy as np
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class, box_iou

    matcher = SimpleNamespace(iouv=torch.linspace(0.5, 0.95, 10))
    gtb = [[] for _ in gt["images"]]
    gtc = [[] for _ in gt["images"]]
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        gtb[a["image_id"]].append([x, y, x + w, y + h])
        gtc[a["image_id"]].append(a["category_id"])
    tp, conf, pcls, tcls = [], [], [], []
    for i, (boxes, scores, cls) in enumerate(dets):
        tcls.append(np.asarray(gtc[i], dtype=np.float64))
        if not len(cls):
            continue
        order = scores.argsort(descending=True)
        boxes, scores, cls = boxes[order], scores[order], cls[order]
        if gtc[i]:
            iou = box_iou(torch.tensor(gtb[i], dtype=torch.float64), boxes)
            tp.append(BaseValidator.match_predictions(matcher, cls, torch.tensor(gtc[i], dtype=cls.dtype), iou).numpy())
        else:
            tp.append(np.zeros((len(cls), 10), bool))
        conf.append(scores.numpy())
        pcls.append(cls.numpy())
    ap = ap_per_class(np.concatenate(tp), np.concatenate(conf), np.concatenate(pcls), np.concatenate(tcls))[5]
    return float(ap[:, 0].mean()), float(ap.mean())


def decomposition(model, adapter, data: str, imgsz: int, batch: int, iou: float) -> dict:
    """Each difference between the two evaluators, switched on one at a time on the same model (mAP50, mAP50-95)."""
    from ultralytics.utils import nms, ops

    from trt_qat.data.transforms import scale_boxes_to_original

    dataset = adapter.dataset(data, "val", imgsz=imgsz)
    gt = dataset.coco_ground_truth()
    ours_items = _items(dataset)
    index_of = {Path(p).name: i for i, p in enumerate(dataset.image_paths)}
    if len(index_of) != len(dataset):
        raise SystemExit("image file names repeat in the split; the decomposition matches images by name")

    def our_decode(outputs):
        return adapter.decode(outputs, 0.001, iou, 300)

    def ul_decode(outputs):  # DetectionValidator.postprocess in 8.4: multi_label=True, class-aware, max_det 300
        p = torch.as_tensor(next(iter(outputs.values()))).float()
        return nms.non_max_suppression(p, 0.001, iou, nc=0, multi_label=True, max_det=300)

    def our_to_orig(boxes, meta):
        return torch.as_tensor(scale_boxes_to_original(boxes.numpy(), meta["ratio"], meta["pad"], meta["orig_shape"]))

    def ul_to_orig(boxes, it):
        return ops.scale_boxes((imgsz, imgsz), boxes.clone(), it["ori_shape"], ratio_pad=it["ratio_pad"])

    ul_items = _ultralytics_items(data, imgsz, index_of)
    base = _detect(model, ours_items, our_decode, our_to_orig, batch)
    rows = {
        "ours": _pycoco(gt, base),
        "metric": _ap_per_class(gt, base),
        "nms": _pycoco(gt, _detect(model, ours_items, ul_decode, our_to_orig, batch)),
        "preprocess": _pycoco(gt, _detect(model, ul_items, our_decode, ul_to_orig, batch)),
    }
    ul_all = _detect(model, ul_items, ul_decode, ul_to_orig, batch)
    rows["all_pycoco"] = _pycoco(gt, ul_all)
    rows["all_ap_per_class"] = _ap_per_class(gt, ul_all)
    return {"rows": rows, "gt": gt, "index_of": index_of}


def ours(model, adapter, data: str, imgsz: int, batch: int, iou: float, max_images=None) -> dict:
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.runners.torch_runner import TorchRunner

    dataset = adapter.dataset(data, "val", imgsz=imgsz, max_images=max_images)
    res = evaluate(TorchRunner(model), dataset, batch_size=batch, iou_thres=iou, adapter=adapter)
    return {"map50": res["map50"], "map50_95": res["map50_95"], "images": res["images"]}


def theirs(model, data: str, imgsz: int, batch: int, iou: float, rect: bool, workdir: Path,
           save_json: bool = False) -> dict:
    """``YOLO(<the same weights>).val(...)``: offline, on the CPU, no plots. With ``save_json`` its detections
    (``predictions.json``, original-image pixels) are returned too; its own faster-coco-eval step is skipped."""
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionValidator

    net = copy.deepcopy(model).float().eval()
    head = net.model[-1]
    head.export, head.format = False, None  # the validator wants Ultralytics' own (y, raw) eval output
    path = workdir / "weights.pt"
    torch.save({"model": net, "train_args": {"imgsz": imgsz}}, path)
    eval_json = DetectionValidator.eval_json
    DetectionValidator.eval_json = lambda self, stats: stats  # (needs faster-coco-eval; we score the JSON ourselves)
    try:
        metrics = YOLO(str(path), task="detect").val(data=data, imgsz=imgsz, batch=batch, conf=0.001, iou=iou,
                                                     device="cpu", plots=False, rect=rect, workers=0, verbose=False,
                                                     project=str(workdir), name="val", half=False,
                                                     save_json=save_json)
    finally:
        DetectionValidator.eval_json = eval_json
    out = {"map50": float(metrics.box.map50), "map50_95": float(metrics.box.map), "rect": rect}
    if save_json:
        out["predictions"] = json.loads((Path(metrics.save_dir) / "predictions.json").read_text())
    return out


def _score_their_json(predictions: list, gt: dict, index_of: dict) -> tuple:
    """Ultralytics' own validator detections, scored by trt_qat's pycocotools path against trt_qat's ground truth
    (its JSON names images by file and classes as ``class + 1`` for a non-COCO dataset)."""
    from trt_qat.measure.evaluate import coco_map

    dets = [{"image_id": index_of[d["file_name"]], "category_id": int(d["category_id"]) - 1, "bbox": d["bbox"],
             "score": d["score"]} for d in predictions]
    return coco_map(gt, dets, range(len(gt["images"])))


def run(checkpoint: str, data: str, imgsz: int | None, batch: int, iou: float) -> dict:
    from trt_qat.models.adapter import load_fp32

    model, adapter = load_fp32(checkpoint)
    imgsz = imgsz or getattr(model, "trt_qat_imgsz", None) or 640
    result = {"checkpoint": checkpoint, "imgsz": imgsz, "iou": iou, "ours": ours(model, adapter, data, imgsz, batch,
                                                                                 iou)}
    dec = decomposition(model, adapter, data, imgsz, batch, iou)
    result["decomposition"] = {k: {"map50": v[0], "map50_95": v[1]} for k, v in dec["rows"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        for rect in (True, False):
            row = theirs(model, data, imgsz, batch, iou, rect, Path(tmp), save_json=not rect)
            if "predictions" in row:
                m50, m = _score_their_json(row.pop("predictions"), dec["gt"], dec["index_of"])
                result["decomposition"]["their_json_pycoco"] = {"map50": m50, "map50_95": m}
            result[f"ultralytics_rect_{str(rect).lower()}"] = row
    return result


def main(argv=None):
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="FP32 checkpoint of the ultralytics family written by trt_qat")
    p.add_argument("--data", required=True)
    p.add_argument("--imgsz", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iou", type=float, default=0.6, help="NMS IoU threshold for both (default 0.6)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(args.checkpoint, args.data, args.imgsz, args.batch, args.iou)
    o, r, s = res["ours"], res["ultralytics_rect_true"], res["ultralytics_rect_false"]
    print(f"\nval split, {o['images']} images, imgsz {res['imgsz']}, NMS IoU {res['iou']}, conf 0.001")
    print("| evaluator | letterbox | mAP50 | mAP50-95 | Δ mAP50-95 vs ours (points) |\n|---|---|---|---|---|")
    print(f"| trt_qat (pycocotools) | square | {o['map50']:.4f} | {o['map50_95']:.4f} | — |")
    for name, row in (("rect batches (its default)", r), ("square (rect=False)", s)):
        print(f"| Ultralytics model.val() | {name} | {row['map50']:.4f} | {row['map50_95']:.4f} | "
              f"{100 * (row['map50_95'] - o['map50_95']):+.2f} |")
    d = res["decomposition"]
    print("\nthe difference, one cause at a time (same FP32 model; each row changes one step of trt_qat's path)")
    print("| step changed | detections | scored by | mAP50 | mAP50-95 | Δ mAP50-95 vs ours (points) |\n"
          "|---|---|---|---|---|---|")
    for key, step, dets, metric in (
            ("ours", "none (trt_qat's evaluate path)", "ours", "pycocotools"),
            ("metric", "metric", "ours (the same)", "Ultralytics ap_per_class"),
            ("preprocess", "pre-processing: Ultralytics' cv2 resize + LetterBox (its per-axis mapping)", "our NMS",
             "pycocotools"),
            ("nms", "NMS: Ultralytics multi_label=True (a box per class > conf)", "ours + multi-label", "pycocotools"),
            ("all_pycoco", "all of Ultralytics' steps but the metric", "Ultralytics'", "pycocotools"),
            ("their_json_pycoco", "model.val(save_json) predictions.json", "Ultralytics' own", "pycocotools"),
            ("all_ap_per_class", "all of Ultralytics' steps", "Ultralytics'", "Ultralytics ap_per_class")):
        if key in d:
            print(f"| {step} | {dets} | {metric} | {d[key]['map50']:.4f} | {d[key]['map50_95']:.4f} | "
                  f"{100 * (d[key]['map50_95'] - o['map50_95']):+.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
