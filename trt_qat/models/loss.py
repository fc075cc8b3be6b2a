"""YOLOv5-style detection loss for :class:`~trt_qat.models.yolo.YoloDetector`.

Target assignment: a target is matched to every anchor whose width/height ratio to it is below ``anchor_t``
(both ways), on its own grid cell and on the two neighbouring cells nearest to its centre. Box loss is
1 - CIoU, objectness is BCE-with-logits against the (detached, clamped) CIoU of the matched prediction, with a
per-level balance, and the class loss is BCE over one-hot targets. The total is scaled by the batch size.
"""
from __future__ import annotations

import torch
from torch import nn

from trt_qat.errors import TrtQatError

__all__ = ["YoloLoss", "detection_loss_fn", "find_detect_head"]

_LEVEL_BALANCE = {3: (4.0, 1.0, 0.4)}
_NEIGHBOUR_G = 0.5  # a centre closer than this to a cell border also claims the neighbour cell


def find_detect_head(model: nn.Module):
    """The detection head (a module with ``anchors``, ``stride``, ``nc``, ``na``, ``nl``) inside ``model``."""
    head = getattr(model, "detect", None)
    if head is not None and hasattr(head, "anchors"):
        return head
    for m in model.modules():
        if all(hasattr(m, a) for a in ("anchors", "stride", "nc", "na", "nl")):
            return m
    raise TrtQatError(f"{type(model).__name__} has no YOLO Detect head (anchors/stride/nc); the YOLO loss only "
                      "works with trt_qat's built-in detectors")


class YoloLoss:
    """YOLOv5-style loss.

    Args:
        model (nn.Module): a built-in detector; anchors, strides and ``nc`` are read from its Detect head.
        box_gain (float): weight of the CIoU box loss. Defaults to 0.05.
        obj_gain (float): weight of the objectness loss. Defaults to 1.0.
        cls_gain (float): weight of the class loss. Defaults to 0.5.
        anchor_t (float): anchor/target width-height ratio threshold for matching. Defaults to 4.0.
        balance (sequence[float] | None): objectness weight per level. Defaults to (4.0, 1.0, 0.4).
    """

    def __init__(self, model: nn.Module, box_gain: float = 0.05, obj_gain: float = 1.0, cls_gain: float = 0.5,
                 anchor_t: float = 4.0, balance=None):
        head = find_detect_head(model)
        self.nc, self.na, self.nl = int(head.nc), int(head.na), int(head.nl)
        stride = head.stride.detach().float().cpu()
        # anchors in grid units per level: [nl, na, 2]
        self.anchors = head.anchors.detach().float().cpu() / stride.view(-1, 1, 1)
        self.box_gain, self.obj_gain, self.cls_gain = float(box_gain), float(obj_gain), float(cls_gain)
        self.anchor_t = float(anchor_t)
        self.balance = list(balance) if balance is not None else list(_LEVEL_BALANCE.get(self.nl, [1.0] * self.nl))
        if len(self.balance) != self.nl:
            raise TrtQatError(f"balance has {len(self.balance)} entries but the model has {self.nl} levels; "
                              "give one weight per level")
        self._bce = nn.BCEWithLogitsLoss()

    def __call__(self, preds, targets):
        """Compute the loss.

        Args:
            preds (list[Tensor]): raw maps ``[B, na, H, W, 5 + nc]``, one per level (model in train mode).
            targets (Tensor): ``[N, 6]`` rows ``(batch_idx, cls, cx, cy, w, h)``, normalized to the input.

        Returns:
            tuple[Tensor, Tensor]: total loss (scalar, times batch size) and detached ``[box, obj, cls]``.
        """
        if isinstance(preds, torch.Tensor) or len(preds) != self.nl:
            raise TrtQatError("the YOLO loss needs the per-level raw maps; call model.train() before the forward "
                              "pass (in eval mode the model returns decoded boxes)")
        device = preds[0].device
        targets = targets.to(device=device, dtype=torch.float32).reshape(-1, 6)
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for i, p in enumerate(preds):
            b, a, gj, gi, tbox, tcls, anch = self._build_targets(p, targets, i)
            tobj = torch.zeros(p.shape[:4], device=device, dtype=p.dtype)
            if b.numel():
                ps = p[b, a, gj, gi].float()
                pxy = ps[:, 0:2].sigmoid() * 2.0 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2.0) ** 2 * anch
                ciou_loss = _ciou_loss(torch.cat((pxy, pwh), 1), tbox)
                lbox = lbox + ciou_loss.mean()
                iou = (1.0 - ciou_loss).detach().clamp(0.0)
                # duplicates (same cell and anchor): write the best IoU last so it wins
                order = iou.argsort()
                tobj[b[order], a[order], gj[order], gi[order]] = iou[order].to(tobj.dtype)
                if self.nc > 1:
                    t = torch.zeros_like(ps[:, 5:])
                    t[torch.arange(len(tcls), device=device), tcls] = 1.0
                    lcls = lcls + self._bce(ps[:, 5:], t)
            lobj = lobj + self._bce(p[..., 4].float(), tobj.float()) * self.balance[i]
        lbox = lbox * self.box_gain
        lobj = lobj * self.obj_gain
        lcls = lcls * self.cls_gain
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.stack((lbox, lobj, lcls)).detach()

    def _build_targets(self, p, targets, i: int):
        """Match targets to anchors and cells of level ``i``; return indices and targets in grid units."""
        device = p.device
        ny, nx = p.shape[2], p.shape[3]
        anchors = self.anchors[i].to(device)                                   # [na, 2] grid units
        nt = targets.shape[0]
        empty = torch.zeros(0, dtype=torch.long, device=device)
        if nt == 0:
            return empty, empty, empty, empty, torch.zeros(0, 4, device=device), empty, torch.zeros(0, 2, device=device)
        scale = torch.tensor([nx, ny, nx, ny], device=device, dtype=torch.float32)
        t = targets[:, 2:6] * scale                                           # [nt, 4] xywh in grid units
        # anchor matching by width/height ratio
        r = t[None, :, 2:4] / anchors[:, None, :]                             # [na, nt, 2]
        ok = torch.max(r, 1.0 / r).max(2).values < self.anchor_t              # [na, nt]
        a_idx, t_idx = ok.nonzero(as_tuple=True)
        gxy = t[t_idx, 0:2]
        gxy_inv = torch.tensor([nx, ny], device=device, dtype=torch.float32) - gxy
        g = _NEIGHBOUR_G
        left, up = ((gxy % 1.0 < g) & (gxy > 1.0)).T
        right, down = ((gxy_inv % 1.0 < g) & (gxy_inv > 1.0)).T
        offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=torch.float32) * g
        use = torch.stack((torch.ones_like(left), left, up, right, down))    # [5, m]
        k_idx, m_idx = use.nonzero(as_tuple=True)
        a_sel, t_sel = a_idx[m_idx], t_idx[m_idx]
        gxy = gxy[m_idx]
        gij = (gxy - offsets[k_idx]).long()
        gi = gij[:, 0].clamp(0, nx - 1)
        gj = gij[:, 1].clamp(0, ny - 1)
        tbox = torch.cat((gxy - torch.stack((gi, gj), 1).float(), t[t_sel, 2:4]), 1)
        b = targets[t_sel, 0].long()
        tcls = targets[t_sel, 1].long()
        return b, a_sel, gj, gi, tbox, tcls, anchors[a_sel]


def _ciou_loss(box1_xywh, box2_xywh):
    """Element-wise 1 - CIoU of two [n, 4] xywh box sets (torchvision's implementation)."""
    from torchvision.ops import box_convert, complete_box_iou_loss

    return complete_box_iou_loss(box_convert(box1_xywh, "cxcywh", "xyxy"), box_convert(box2_xywh, "cxcywh", "xyxy"),
                                 reduction="none", eps=1e-7)


def detection_loss_fn(model: nn.Module, **loss_kwargs):
    """A ``loss_fn(model, batch) -> loss`` for the training and QAT loops.

    Args:
        model (nn.Module): the detector (anchors, strides and ``nc`` are read from it).
        **loss_kwargs: passed to :class:`YoloLoss` (box_gain, obj_gain, cls_gain, anchor_t).

    Returns:
        Callable: ``loss_fn(model, batch)`` where ``batch = (imgs, targets, metas)``; moves the tensors to the
        model's device, runs the model (which must be in train mode) and returns the scalar loss. The last
        loss items ``[box, obj, cls]`` are kept in ``loss_fn.last_items``.
    """
    criterion = YoloLoss(model, **loss_kwargs)

    def loss_fn(model, batch):
        imgs, targets = batch[0], batch[1]
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        preds = model(imgs.to(device, non_blocking=True))
        loss, items = criterion(preds, targets.to(device, non_blocking=True))
        loss_fn.last_items = items
        return loss

    loss_fn.criterion = criterion
    loss_fn.last_items = None
    return loss_fn


def output_distill_loss(student, teacher) -> torch.Tensor:
    """Distillation loss on the raw head outputs (train mode: per level ``[B, na, H, W, 5 + nc]`` logits), by what
    each channel means: box centre and size as the decoded sigmoids (MSE), objectness as BCE against the
    teacher's probability, and classes as BCE against the teacher's probabilities weighted by the teacher's
    objectness (class scores only matter where there is an object). Averaged over the levels."""
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        t_obj = t[..., 4].sigmoid()
        box = nn.functional.mse_loss(s[..., :4].sigmoid(), t[..., :4].sigmoid())
        obj = nn.functional.binary_cross_entropy_with_logits(s[..., 4], t_obj)
        cls = nn.functional.binary_cross_entropy_with_logits(s[..., 5:], t[..., 5:].sigmoid(), reduction="none")
        cls = (cls.mean(-1) * t_obj).sum() / t_obj.sum().clamp_min(1e-6)
        terms.append(box + obj + cls)
    return torch.stack(terms).mean()
