"""Post-processing of decoded detector output: confidence filtering and class-aware NMS.

The same function runs after every backend (PyTorch, ONNX Runtime, TensorRT), so accuracy differences between
runners come from the model, never from the decoding.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["non_max_suppression", "class_aware_nms", "xywh_to_xyxy"]

_MAX_NMS_INPUT = 30000  # boxes kept (by score) before NMS
_MIN_WH = 2.0           # boxes thinner than this many pixels are dropped


def xywh_to_xyxy(x: torch.Tensor) -> torch.Tensor:
    """[..., 4] centre-x, centre-y, width, height -> x1, y1, x2, y2."""
    xy, half = x[..., 0:2], x[..., 2:4] / 2
    return torch.cat((xy - half, xy + half), -1)


def non_max_suppression(pred, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300):
    """Class-aware NMS on decoded predictions.

    Args:
        pred (Tensor | np.ndarray): ``[B, N, 5 + nc]`` rows ``(cx, cy, w, h, obj, cls_0..cls_nc-1)``, with
            objectness and class scores already as probabilities (the model's eval output).
        conf_thres (float): minimum score ``obj * cls``. Defaults to 0.001.
        iou_thres (float): IoU above which a lower-scored box of the same class is suppressed. Defaults to 0.6.
        max_det (int): detections kept per image. Defaults to 300.

    Returns:
        list[Tensor]: per image a float32 ``[n, 6]`` tensor ``(x1, y1, x2, y2, score, cls)`` on the input's
        device (CPU for numpy input), sorted by descending score.
    """

    if isinstance(pred, np.ndarray):
        pred = torch.from_numpy(pred)
    if pred.ndim == 2:
        pred = pred[None]
    if pred.ndim != 3 or pred.shape[-1] < 6:
        raise ValueError(f"expected predictions shaped [B, N, 5 + nc], got {tuple(pred.shape)}")
    pred = pred.float()
    out = []
    for x in pred:
        x = x[x[:, 4] > conf_thres]
        if x.shape[0]:
            scores, cls = (x[:, 5:] * x[:, 4:5]).max(1)
            keep = (scores > conf_thres) & (x[:, 2] > _MIN_WH) & (x[:, 3] > _MIN_WH)
            x, scores, cls = x[keep], scores[keep], cls[keep]
        if x.shape[0] == 0:
            out.append(torch.zeros((0, 6), device=pred.device))
            continue
        out.append(class_aware_nms(x[:, :4], scores, cls, iou_thres, max_det))
    return out


def class_aware_nms(xywh, scores, cls, iou_thres: float, max_det: int):
    """``[n, 6]`` rows (x1, y1, x2, y2, score, class) kept by torchvision's class-aware NMS, best first, at most
    ``max_det``; only the :data:`_MAX_NMS_INPUT` best candidates enter it."""
    from torchvision.ops import batched_nms

    if xywh.shape[0] > _MAX_NMS_INPUT:
        top = scores.topk(_MAX_NMS_INPUT).indices
        xywh, scores, cls = xywh[top], scores[top], cls[top]
    boxes = xywh_to_xyxy(xywh)
    keep = batched_nms(boxes, scores, cls, iou_thres)[:max_det]   # sorted by descending score
    return torch.cat((boxes[keep], scores[keep, None], cls[keep, None].float()), 1)
