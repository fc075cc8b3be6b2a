"""What every detection dataset shares: :class:`DetectionDataset` (loading, letterboxing, augmentation, COCO
ground truth) and the batching (:func:`collate_fn`, :func:`build_dataloader`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trt_qat.data.transforms import letterbox, xywhn_to_xyxy, xyxy_to_xywhn
from trt_qat.errors import TrtQatError

__all__ = ["IMAGE_EXTENSIONS", "DetectionDataset", "collate_fn", "build_dataloader"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DetectionDataset(torch.utils.data.Dataset):
    """Common base of :class:`YoloDataset` and :class:`~trt_qat.data.coco.CocoDataset`.

    Subclasses fill ``image_paths`` (list[Path]), ``shapes`` (list of original (h, w)), ``labels`` (list of float32
    [n,5] arrays: cls, cx, cy, w, h normalized to the ORIGINAL image), ``nc``, ``names``; this class does the
    loading, letterboxing, augmentation and COCO ground truth.
    """

    image_paths: list
    shapes: list
    labels: list
    nc: int
    names: list

    def __init__(self, imgsz=128, augment: bool = False, cache: bool = False):
        self.imgsz = imgsz
        self.augment = bool(augment)
        self.cache = bool(cache)
        self._cache: dict = {}

    # -- torch Dataset protocol
    def __len__(self) -> int:
        return len(self.image_paths)

    def load_image(self, i: int) -> np.ndarray:
        """The original image ``i`` as HxWx3 uint8 RGB."""
        from PIL import Image

        if i in self._cache:
            return self._cache[i]
        path = self.image_paths[i]
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise TrtQatError(f"image '{path}' cannot be decoded ({exc}); remove it from the dataset") from None
        if self.cache:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        img0 = self.load_image(i)
        h0, w0 = img0.shape[:2]
        img, ratio, pad = letterbox(img0, self.imgsz)
        out_h, out_w = img.shape[:2]
        labels = self.labels[i]
        boxes = xywhn_to_xyxy(labels[:, 1:5], w0 * ratio, h0 * ratio, pad[0], pad[1])
        cls = labels[:, 0].astype(np.float64)
        if self.augment:
            img, boxes, cls = _augment(img, boxes, cls)
        xywhn = xyxy_to_xywhn(boxes, out_w, out_h)
        target = np.concatenate([cls[:, None], xywhn], axis=1).astype(np.float32).reshape(-1, 5)
        img_t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        meta = {"image_id": int(i), "path": str(self.image_paths[i]), "orig_shape": (int(h0), int(w0)),
                "ratio": float(ratio), "pad": (float(pad[0]), float(pad[1]))}
        return img_t, torch.from_numpy(target), meta

    # -- evaluation
    def coco_ground_truth(self) -> dict:
        """Ground truth in COCO format, boxes in original-image pixels, ``category_id`` = class index,
        ``image_id`` = dataset index (as in ``meta['image_id']``)."""
        images, annotations = [], []
        ann_id = 1
        for i, (path, (h, w), labels) in enumerate(zip(self.image_paths, self.shapes, self.labels)):
            images.append({"id": i, "file_name": Path(path).name, "height": int(h), "width": int(w)})
            for cls, cx, cy, bw, bh in labels.astype(np.float64).tolist():
                x, y, pw, ph = (cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h
                annotations.append({"id": ann_id, "image_id": i, "category_id": int(cls),
                                    "bbox": [x, y, pw, ph], "area": pw * ph, "iscrowd": 0})
                ann_id += 1
        categories = [{"id": c, "name": name, "supercategory": "object"} for c, name in enumerate(self.names)]
        return {"info": {"description": f"trt_qat ground truth ({type(self).__name__})"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}

    def _set_items(self, kept: list, where: str) -> None:
        """Store the kept ``(path, (h, w), labels)`` items; raise if there are none."""
        if not kept:
            raise TrtQatError(f"no images found in '{where}'; put images ({', '.join(IMAGE_EXTENSIONS)}) there "
                              "or fix the split path")
        self.image_paths = [Path(k[0]) for k in kept]
        self.shapes = [tuple(k[1]) for k in kept]
        self.labels = [k[2] for k in kept]


def _augment(img: np.ndarray, boxes: np.ndarray, cls: np.ndarray):
    """Digit-safe augmentation on a letterboxed image (no flips): brightness/colour jitter and a random
    scale + translate about the centre. Boxes (pixel xyxy) follow; boxes mostly pushed out are dropped."""
    from PIL import Image

    h, w = img.shape[:2]
    r = torch.rand(7).tolist()
    gain = 0.75 + 0.5 * r[0]
    channel = np.array([0.92 + 0.16 * r[1], 0.92 + 0.16 * r[2], 0.92 + 0.16 * r[3]], dtype=np.float32)
    out = np.clip(img.astype(np.float32) * (gain * channel), 0, 255).astype(np.uint8)

    s = 0.75 + 0.5 * r[4]
    tx, ty = (r[5] - 0.5) * 0.2 * w, (r[6] - 0.5) * 0.2 * h
    cx, cy = w / 2.0, h / 2.0
    # PIL wants the inverse map: output (x', y') samples input ((x' - c - t) / s + c)
    inv = (1 / s, 0.0, cx - (cx + tx) / s, 0.0, 1 / s, cy - (cy + ty) / s)
    out = np.asarray(Image.fromarray(out).transform((w, h), Image.AFFINE, inv, resample=Image.BILINEAR,
                                                    fillcolor=(114, 114, 114)))
    if len(boxes):
        moved = boxes.copy()
        moved[:, [0, 2]] = s * (boxes[:, [0, 2]] - cx) + cx + tx
        moved[:, [1, 3]] = s * (boxes[:, [1, 3]] - cy) + cy + ty
        area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        moved[:, [0, 2]] = moved[:, [0, 2]].clip(0, w)
        moved[:, [1, 3]] = moved[:, [1, 3]].clip(0, h)
        bw, bh = moved[:, 2] - moved[:, 0], moved[:, 3] - moved[:, 1]
        keep = (bw > 2) & (bh > 2) & (bw * bh >= 0.6 * area)
        boxes, cls = moved[keep], cls[keep]
    return out, boxes, cls


def collate_fn(batch):
    """Stack a list of ``(img, labels, meta)`` into ``(imgs [B,3,H,W], targets [N,6], metas)``;
    targets rows are ``(batch_idx, cls, cx, cy, w, h)``."""
    imgs, labels, metas = zip(*batch)
    targets = [torch.cat([torch.full((len(lb), 1), float(i), dtype=torch.float32), lb.float()], dim=1)
               for i, lb in enumerate(labels)]
    return torch.stack(imgs, 0), torch.cat(targets, 0).reshape(-1, 6), list(metas)


def build_dataloader(dataset, batch_size: int = 16, shuffle: bool = False, workers: int = 0, sampler=None,
                     drop_last: bool = False):
    """A ``torch.utils.data.DataLoader`` over a detection dataset with :func:`collate_fn`.

    Args:
        dataset (DetectionDataset): The dataset.
        batch_size (int): Images per batch. Defaults to 16.
        shuffle (bool): Shuffle each epoch (ignored when ``sampler`` is given). Defaults to False.
        workers (int): Loader worker processes. Defaults to 0 (load in the main process).
        sampler (torch.utils.data.Sampler | None): E.g. a DistributedSampler. Defaults to None.
        drop_last (bool): Drop the last incomplete batch. Defaults to False.
    """
    workers = max(int(workers), 0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=int(batch_size), shuffle=bool(shuffle) and sampler is None, sampler=sampler,
        num_workers=workers, collate_fn=collate_fn, drop_last=bool(drop_last),
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
