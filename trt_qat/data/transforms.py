"""Letterbox resize (keep aspect, pad centred) and its inverse for boxes, plus box-format helpers.

The same functions are used for training, calibration and evaluation on every backend, so predictions are mapped
back to original-image pixels identically everywhere.
"""
from __future__ import annotations

import numpy as np

__all__ = ["letterbox", "scale_boxes_to_original", "xywhn_to_xyxy", "xyxy_to_xywhn"]


def _as_hw(new_shape) -> tuple[int, int]:
    if isinstance(new_shape, (int, np.integer)):
        return int(new_shape), int(new_shape)
    h, w = new_shape
    return int(h), int(w)


def letterbox(img: np.ndarray, new_shape=128, color=114):
    """Resize ``img`` to fit ``new_shape`` keeping its aspect ratio (up or down), then pad it centred.

    Args:
        img (np.ndarray): HxWx3 (or HxW) uint8 image.
        new_shape (int | tuple[int, int]): Output size, square side or (h, w). Defaults to 128.
        color (int | tuple[int, int, int]): Padding value. Defaults to 114.

    Returns:
        tuple: ``(img_out, (ratio_w, ratio_h), (pad_w, pad_h))`` where a point ``(x, y)`` of the input maps to
        ``(x * ratio_w + pad_w, y * ratio_h + pad_h)`` in the output. The two ratios are the scales each axis
        actually got (``new_w / w`` and ``new_h / h``, after rounding the resized size to whole pixels), so boxes map
        back exactly; they differ from each other by less than a pixel's worth.
    """
    from PIL import Image

    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"letterbox expects a non-empty HxWx3 image, got shape {tuple(img.shape)}")
    out_h, out_w = _as_hw(new_shape)
    h, w = img.shape[:2]
    ratio = min(out_h / h, out_w / w)
    new_w = min(out_w, max(1, round(w * ratio)))
    new_h = min(out_h, max(1, round(h * ratio)))
    if (new_w, new_h) != (w, h):
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((new_w, new_h), Image.BILINEAR))
    left = (out_w - new_w) // 2
    top = (out_h - new_h) // 2
    shape = (out_h, out_w) + tuple(img.shape[2:])
    fill = np.asarray(color, dtype=np.uint8)
    out = np.empty(shape, dtype=np.uint8)
    out[...] = fill if img.ndim == 3 or fill.ndim == 0 else fill.flat[0]
    out[top:top + new_h, left:left + new_w] = img
    return out, (new_w / w, new_h / h), (float(left), float(top))


def scale_boxes_to_original(boxes_xyxy, ratio: float, pad, orig_shape):
    """Map xyxy boxes from letterboxed pixels back to the original image's pixels and clip them to it.

    Args:
        boxes_xyxy (np.ndarray | torch.Tensor): [N,4] (or [N,>=4]: only the first 4 columns are changed).
        ratio (float | tuple[float, float]): Letterbox scale: ``(ratio_w, ratio_h)`` as returned by
            :func:`letterbox`, or one scale for both axes.
        pad (tuple[float, float]): ``(pad_w, pad_h)`` as returned by :func:`letterbox`.
        orig_shape (tuple[int, int]): Original ``(h, w)``.

    Returns:
        Same type as ``boxes_xyxy``: a new array/tensor in original-image pixels.
    """
    pad_w, pad_h = float(pad[0]), float(pad[1])
    h, w = float(orig_shape[0]), float(orig_shape[1])
    out = boxes_xyxy.clone() if hasattr(boxes_xyxy, "clone") else np.array(boxes_xyxy, dtype=np.float64, copy=True)
    if out.shape[0] == 0:
        return out
    ratio_w, ratio_h = (float(ratio), float(ratio)) if np.ndim(ratio) == 0 else (float(ratio[0]), float(ratio[1]))
    out[:, [0, 2]] = ((out[:, [0, 2]] - pad_w) / ratio_w).clip(0.0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - pad_h) / ratio_h).clip(0.0, h)
    return out


def xywhn_to_xyxy(xywhn: np.ndarray, w: float, h: float, pad_w: float = 0.0, pad_h: float = 0.0) -> np.ndarray:
    """Normalized [N,4] (cx, cy, w, h) -> pixel xyxy, scaled by (w, h) and shifted by (pad_w, pad_h)."""
    xywhn = np.asarray(xywhn, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(xywhn)
    out[:, 0] = w * (xywhn[:, 0] - xywhn[:, 2] / 2) + pad_w
    out[:, 1] = h * (xywhn[:, 1] - xywhn[:, 3] / 2) + pad_h
    out[:, 2] = w * (xywhn[:, 0] + xywhn[:, 2] / 2) + pad_w
    out[:, 3] = h * (xywhn[:, 1] + xywhn[:, 3] / 2) + pad_h
    return out


def xyxy_to_xywhn(xyxy: np.ndarray, w: float, h: float) -> np.ndarray:
    """Pixel [N,4] xyxy -> normalized (cx, cy, w, h) relative to an image of width ``w`` and height ``h``."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(xyxy)
    out[:, 0] = (xyxy[:, 0] + xyxy[:, 2]) / 2 / w
    out[:, 1] = (xyxy[:, 1] + xyxy[:, 3]) / 2 / h
    out[:, 2] = (xyxy[:, 2] - xyxy[:, 0]) / w
    out[:, 3] = (xyxy[:, 3] - xyxy[:, 1]) / h
    return out
