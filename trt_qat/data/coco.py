"""COCO-JSON detection datasets with the same interface as :class:`~trt_qat.data.yolo.YoloDataset`.

COCO category ids (sparse, e.g. 1..90) are mapped to contiguous class indices 0..nc-1 in ascending id order;
``class_to_category_id`` keeps the way back. :meth:`coco_ground_truth` uses the contiguous indices as
``category_id`` and the dataset index as ``image_id``, exactly like the YOLO dataset, so evaluation code treats
both the same. Crowd annotations (``iscrowd: 1``) are ignored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from trt_qat.data.dataset import DetectionDataset
from trt_qat.data.yolo import scan_split
from trt_qat.errors import LOG, TrtQatError

__all__ = ["CocoDataset"]


def _load_json(ann_json: Path) -> dict:
    if not ann_json.is_file():
        what = "is a directory, not a file" if ann_json.is_dir() else "does not exist"
        raise TrtQatError(f"COCO annotation file '{ann_json}' {what}; pass the path of an instances_*.json file")
    try:
        doc = json.loads(ann_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrtQatError(f"COCO annotation file '{ann_json}' is not valid JSON ({exc}); fix or replace it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("categories"), list):
        raise TrtQatError(f"COCO annotation file '{ann_json}' lacks an `images` or `categories` list; pass a COCO "
                          "instances json")
    if not isinstance(doc.get("annotations", []), list):
        raise TrtQatError(f"COCO annotation file '{ann_json}': `annotations` must be a list")
    return doc


class CocoDataset(DetectionDataset):
    """A COCO-JSON detection set, letterboxed to ``imgsz``; items are ``(img, labels, meta)`` as for YoloDataset.

    Args:
        ann_json (str | Path): COCO instances json.
        images_dir (str | Path): Directory that the images' ``file_name`` entries are relative to.
        imgsz (int | tuple[int, int]): Letterbox size. Defaults to 128.
        augment (bool): Digit-safe augmentation (see YoloDataset). Defaults to False.
        max_images (int | None): Keep only the first N images (in json order). Defaults to None (all).
        cache (bool): Keep decoded images in memory. Defaults to False.

    Attributes:
        nc, names, imgsz, image_paths, class_to_category_id (list[int]), category_id_to_class (dict[int, int]),
        coco_image_ids (list: the json image id of each dataset index).
    """

    def __init__(self, ann_json, images_dir, imgsz=128, augment: bool = False, max_images=None,
                 cache: bool = False):
        super().__init__(imgsz=imgsz, augment=augment, cache=cache)
        ann_json = Path(ann_json).expanduser()
        images_dir = Path(images_dir).expanduser()
        if not images_dir.is_dir():
            what = "is a file, not a directory" if images_dir.exists() else "does not exist"
            raise TrtQatError(f"COCO images directory '{images_dir}' {what}; pass the directory that holds the "
                              "json's images")
        doc = _load_json(ann_json)
        try:
            cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
            self.class_to_category_id = [int(c["id"]) for c in cats]
            self.names = [str(c.get("name", c["id"])) for c in cats]
            images = [(int(im["id"]), str(im["file_name"]), int(im.get("height", 0) or 0),
                       int(im.get("width", 0) or 0)) for im in doc["images"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise TrtQatError(f"COCO annotation file '{ann_json}' has a malformed image or category entry "
                              f"({type(exc).__name__}: {exc}); each needs an integer `id` (and `file_name`)") from None
        if not self.class_to_category_id:
            raise TrtQatError(f"COCO annotation file '{ann_json}' has no categories; add a `categories` list")
        self.category_id_to_class = {cid: k for k, cid in enumerate(self.class_to_category_id)}
        self.nc = len(self.class_to_category_id)

        boxes_by_image: dict[int, list] = {}
        bad, first_bad, crowd = 0, None, 0
        for ann in doc.get("annotations", []):
            try:
                if ann.get("iscrowd", 0):
                    crowd += 1
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                cls = self.category_id_to_class[int(ann["category_id"])]
                image_id = int(ann["image_id"])
                if not (w > 0 and h > 0 and np.isfinite([x, y, w, h]).all()):
                    raise ValueError("non-positive box size")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                bad += 1
                first_bad = first_bad or f"annotation id {ann.get('id') if isinstance(ann, dict) else '?'} ({exc!r})"
                continue
            boxes_by_image.setdefault(image_id, []).append((cls, x, y, w, h))
        if bad:
            LOG.warning("skipped %d malformed annotation%s in '%s' (first: %s)", bad, "s" if bad != 1 else "",
                        ann_json, first_bad)
        LOG.debug("ignored %d crowd annotations in '%s'", crowd, ann_json)

        if max_images is not None:
            images = images[:max(int(max_images), 0)]
        by_path = {}
        missing = []
        for image_id, file_name, _h, _w in images:
            path = images_dir / file_name
            if path.is_file():
                by_path[path] = image_id
            elif os.path.lexists(path):  # a directory or a broken link where an image should be: not "missing"
                raise TrtQatError(f"image '{path}' of '{ann_json}' is not a regular file (a directory or a "
                                  "broken link); replace it with the image or remove its entry from the json")
            else:
                missing.append(str(path))
        if missing:
            LOG.warning("skipped %d image%s of '%s' missing from '%s' (first: %s)", len(missing),
                        "s" if len(missing) != 1 else "", ann_json, images_dir, missing[0])
        # probe decodability and true sizes; boxes are normalized afterwards, against the file's real size
        kept = scan_split(list(by_path), lambda p: (np.zeros((0, 5), np.float32), []), str(images_dir))
        size_mismatch = []
        items = []
        json_sizes = {image_id: (h, w) for image_id, _f, h, w in images}
        for path, (h, w), _ in kept:
            image_id = by_path[path]
            jh, jw = json_sizes[image_id]
            if (jh, jw) not in ((h, w), (0, 0)):
                size_mismatch.append(f"{path}: json {jw}x{jh}, file {w}x{h}")
            rows = []
            for cls, x, y, bw, bh in boxes_by_image.get(image_id, []):
                x0, y0 = max(x, 0.0), max(y, 0.0)
                x1, y1 = min(x + bw, float(w)), min(y + bh, float(h))
                if x1 <= x0 or y1 <= y0:
                    continue
                rows.append([cls, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
            items.append((path, (h, w), np.asarray(rows, dtype=np.float32).reshape(-1, 5)))
        if size_mismatch:
            LOG.warning("%d image%s of '%s' differ in size from the json (using the file's size; first: %s)",
                        len(size_mismatch), "s" if len(size_mismatch) != 1 else "", ann_json, size_mismatch[0])
        self._set_items(items, str(images_dir))
        self.coco_image_ids = [by_path[p] for p in self.image_paths]
        self.ann_json = str(ann_json)
        self.images_dir = str(images_dir)
