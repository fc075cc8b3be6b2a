"""What every detection dataset shares: :class:`DetectionDataset` (loading, letterboxing, augmentation, COCO
ground truth), the image decoding (:func:`decode_rgb`) and the batching (:func:`collate_fn`,
:func:`build_dataloader`).

Decoding turns every image into the HxWx3 uint8 RGB pixels a label tool shows, or refuses it with one
:class:`~trt_qat.errors.TrtQatError`; nothing is clipped or guessed silently. Per PIL mode:

* ``RGB``, ``L``, ``1``, ``RGBX``, ``YCbCr``, ``HSV``: PIL's conversion (grey is replicated into 3 channels);
  8-bit RGB and grey decode exactly as ``Image.convert("RGB")`` always did.
* ``RGBA``, ``LA``, ``PA``, ``RGBa``, and ``P`` with or without transparency: the alpha is dropped and the
  stored colour is kept (``P`` goes through ``RGBA``, ``RGBa`` is un-premultiplied). That is what OpenCV's
  ``imread`` and so Ultralytics/YOLO tools read, and what trt_qat read before; compositing onto a background
  would be a guess (white? grey 114?) no label tool made.
* ``CMYK``: PIL's conversion, ``R = (255 - C)(255 - K) / 255`` rounded (Adobe-inverted JPEGs are handled by the
  JPEG reader; embedded ICC profiles are not applied).
* ``I;16`` (``I;16L``, ``I;16B``, ``I;16N``), 16-bit grey: 0..65535 is mapped to 0..255 by its high byte
  (``v >> 8``: 65535 -> 255, 32768 -> 128, ``257 * k`` -> ``k``). That is how PIL itself reads 16-bit RGB,
  RGBA and grey+alpha PNGs, so a 16-bit grey PNG decodes like the same picture stored as 16-bit RGB.
* ``I`` (32-bit integer): read as 16-bit grey as above when every value is in 0..65535 (PIL reads a 16-bit PGM
  as ``I`` scaled to 0..65535, older Pillow read 16-bit PNGs as ``I``); other values have no standard 8-bit
  scale (scaling each image by its own maximum would give every image a different brightness) -> refused.
* ``F`` (32-bit float): refused; float pixels have no standard range (0..1? 0..255? radiance?) and any guess
  can be silently wrong. ``LAB``: refused; PIL has no Lab -> sRGB conversion (its ``convert`` copies the
  channels). Any other mode: refused.
* EXIF orientation (the tag PIL's ``ImageOps.exif_transpose`` reads: EXIF, or XMP ``tiff:Orientation``) is
  applied, so pixels and boxes match the upright image label tools show; orientations 5-8 swap width and
  height, and the size probe of the dataset scan (:func:`oriented_shape`) agrees.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from trt_qat.data.transforms import letterbox, xywhn_to_xyxy, xyxy_to_xywhn
from trt_qat.errors import TrtQatError

__all__ = ["IMAGE_EXTENSIONS", "DetectionDataset", "check_image_mode", "decode_rgb", "exif_orientation",
           "oriented_shape", "collate_fn", "build_dataloader"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_ORIENTATION_TAG = 0x0112  # EXIF Orientation
_SWAPS_AXES = (5, 6, 7, 8)  # orientations whose upright image is the stored one transposed / rotated by 90 deg
_VIA_PIL = ("RGB", "L", "1", "RGBX", "YCbCr", "HSV", "CMYK", "RGBA", "LA", "PA", "RGBa", "P")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_TO_8BIT_HINT = "convert it to an 8-bit RGB PNG or JPEG (or a 16-bit grey PNG), or remove it from the dataset"
_REFUSED = {
    "F": "32-bit float pixels (PIL mode F), which have no standard 8-bit scale",
    "LAB": "CIE Lab pixels (PIL mode LAB), which PIL cannot convert to RGB",
}


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
        """The original image ``i`` as HxWx3 uint8 RGB, upright (see :func:`decode_rgb`)."""
        from PIL import Image

        if i in self._cache:
            return self._cache[i]
        path = self.image_paths[i]
        try:
            with Image.open(path) as im:
                img = decode_rgb(im, path)
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as exc:
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
        boxes = xywhn_to_xyxy(labels[:, 1:5], w0 * ratio[0], h0 * ratio[1], pad[0], pad[1])
        cls = labels[:, 0].astype(np.float64)
        if self.augment:
            img, boxes, cls = _augment(img, boxes, cls)
        xywhn = xyxy_to_xywhn(boxes, out_w, out_h)
        target = np.concatenate([cls[:, None], xywhn], axis=1).astype(np.float32).reshape(-1, 5)
        img_t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        meta = {"image_id": int(i), "path": str(self.image_paths[i]), "orig_shape": (int(h0), int(w0)),
                "ratio": (float(ratio[0]), float(ratio[1])), "pad": (float(pad[0]), float(pad[1]))}
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


def check_image_mode(mode: str, source) -> None:
    """Raise unless images of PIL mode ``mode`` can be decoded faithfully by :func:`decode_rgb`.

    Args:
        mode (str): The PIL mode (``Image.mode``; known from the file header).
        source (str | Path): The image, named in the error.

    Raises:
        TrtQatError: For ``F``, ``LAB`` and any mode that :func:`decode_rgb` does not know.
    """
    if mode in _VIA_PIL or mode in _SIXTEEN_BIT or mode == "I":
        return
    what = _REFUSED.get(mode, f"pixels of PIL mode {mode}, which trt_qat cannot convert to RGB faithfully")
    raise TrtQatError(f"image '{source}' has {what}; {_TO_8BIT_HINT}")


def exif_orientation(im) -> int:
    """The EXIF orientation (1-8) that ``PIL.ImageOps.exif_transpose`` applies to ``im``; 1 when there is none.

    Read from the same place as ``exif_transpose`` reads it (``im.getexif()``: EXIF, or XMP
    ``tiff:Orientation``). Cheap for JPEG, TIFF and WebP (header metadata); PIL decodes a PNG whose EXIF is not
    in its header, because the chunks after the pixel data can carry it.

    Args:
        im (PIL.Image.Image): An opened image.

    Returns:
        int: 1 (as stored) to 8; 1 also for a missing or out-of-range tag.
    """
    value = im.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_shape(im) -> tuple[int, int]:
    """``(h, w)`` of ``im`` once its EXIF orientation is applied: the shape :func:`decode_rgb` returns."""
    w, h = im.size
    return (int(w), int(h)) if exif_orientation(im) in _SWAPS_AXES else (int(h), int(w))


def decode_rgb(im, source=None) -> np.ndarray:
    """The pixels of a PIL image as label tools show them: upright, HxWx3 uint8 RGB.

    The choice per PIL mode is in the module docstring: 8-bit colour and grey through PIL, alpha dropped,
    16-bit grey by its high byte, ``I`` as 16-bit when it fits, ``F`` and ``LAB`` refused. EXIF orientation
    is applied as ``PIL.ImageOps.exif_transpose`` does.

    Args:
        im (PIL.Image.Image): An opened image (decoded here; its pixels are left as they are).
        source (str | Path | None): The image, named in errors. Defaults to ``im.filename`` (or "image").

    Returns:
        np.ndarray: HxWx3 uint8, C-contiguous.

    Raises:
        TrtQatError: For a refused mode (see :func:`check_image_mode`) or 32-bit integer pixels outside
            0..65535. Decoder errors of PIL (``OSError`` etc., a truncated file) pass through.
    """
    from PIL import ImageOps

    source = source or getattr(im, "filename", "") or "image"
    check_image_mode(im.mode, source)
    if exif_orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        grey = np.asarray(im)
        if im.mode == "I" and grey.size and (int(grey.min()) < 0 or int(grey.max()) > 65535):
            raise TrtQatError(f"image '{source}' has 32-bit integer pixels in {int(grey.min())}..{int(grey.max())}, "
                              f"outside the 16-bit range 0..65535 it could be read as; {_TO_8BIT_HINT}")
        grey = (grey >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode == "P":  # through RGBA: PIL warns when a palette with per-entry transparency goes straight to RGB
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"))


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
        pin_memory=torch.cuda.is_available(),
        # workers are started afresh each epoch, seeded from torch's RNG: the state last.pt saves (persistent workers
        # would draw their seed once, and a resumed run would reseed them differently)
        persistent_workers=False)
