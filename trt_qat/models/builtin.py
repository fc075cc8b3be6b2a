"""The built-in YOLOv5-style detector (:mod:`trt_qat.models.yolo`) behind the model-adapter seam."""
from __future__ import annotations

from trt_qat.errors import TrtQatError
from trt_qat.models.adapter import ModelAdapter, register_adapter
from trt_qat.models.loss import detection_loss_fn, output_distill_loss
from trt_qat.models.postprocess import non_max_suppression
from trt_qat.models.yolo import build_model, model_from_cfg, model_from_checkpoint, save_checkpoint

__all__ = ["BuiltinAdapter"]


@register_adapter
class BuiltinAdapter(ModelAdapter):
    """``yolo-n`` / ``yolo-s``: checkpoints written by ``trt-qat train`` (``model_cfg`` + ``state_dict``); the eval
    output is one decoded ``[B, N, 5 + nc]`` tensor (``cx, cy, w, h`` in input pixels, objectness, class
    probabilities)."""

    family = "builtin"

    def recognizes(self, ckpt: dict) -> bool:
        return super().recognizes(ckpt) or (isinstance(ckpt, dict) and "model_cfg" in ckpt)

    def build(self, name: str, nc: int):
        return build_model(name, nc=nc)

    def from_checkpoint(self, ckpt: dict, path="<checkpoint>"):
        return model_from_checkpoint(ckpt, path)

    def save(self, model, path, **extra):
        return save_checkpoint(model, path, model_family=self.family, **extra)

    def architecture(self, model) -> dict | None:
        cfg = getattr(model, "cfg", None)  # None: not a built-in detector (a user's own module)
        return dict(cfg) if isinstance(cfg, dict) else None

    def from_architecture(self, arch: dict):
        return model_from_cfg(dict(arch))

    def model_name(self, model) -> str | None:
        return (getattr(model, "cfg", None) or {}).get("name")

    def num_classes(self, model) -> int | None:
        return (getattr(model, "cfg", None) or {}).get("nc")

    def distill_output_loss(self, student, teacher):
        return output_distill_loss(student, teacher)

    def loss_fn(self, model):
        return detection_loss_fn(model)

    def decode(self, outputs, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300) -> list:
        pred = next(iter(outputs.values()))
        shape = [int(d) for d in getattr(pred, "shape", ())]
        if len(shape) != 3 or shape[-1] < 6:
            raise TrtQatError(f"the model's first output has shape {shape}, not the built-in detector's decoded "
                              "[batch, boxes, 5 + classes]; evaluate a detector exported by `trt-qat export`")
        return non_max_suppression(pred, conf_thres, iou_thres, max_det)
