"""Ultralytics YOLO detectors (YOLOv8, YOLO11, YOLO26, ...: ``ultralytics.nn.tasks.DetectionModel``) behind the
model-adapter seam.

The ``ultralytics`` package is optional (``pip install trt-qat[ultralytics]``) and is imported only inside the
functions that need it: importing this module (which :func:`trt_qat.models.adapter.get_adapter` does on first use
of the family, or when a checkpoint names no family) never imports it.

* Models are built offline from a model yaml (``yolov8n.yaml``, ``yolo11n.yaml``, ``yolo26n.yaml``, or a path).
* Ultralytics ``.pt`` files are pickles of whole modules; :meth:`UltralyticsAdapter.load` is the only place that
  unpickles one. Files trt_qat writes hold data only (the model yaml, class names and a ``state_dict``) and are read
  with ``torch.load(weights_only=True)`` like every other trt_qat checkpoint.
* The Detect head is put in Ultralytics' export mode, so that in eval mode the model returns one decoded tensor
  ``[B, 4 + nc, N]`` (``cx, cy, w, h`` in input pixels, class probabilities), the ONNX output ``output0``.
* Training calls Ultralytics' own criterion (``DetectionModel.init_criterion()``: ``v8DetectionLoss``, or
  ``E2ELoss`` for heads with a one-to-one branch).
"""
from __future__ import annotations

import copy
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from trt_qat.errors import TrtQatError
from trt_qat.fileio import atomic_torch_save, restricted_pickle
from trt_qat.models.adapter import SequentialDetectorAdapter, names_list, register_adapter
from trt_qat.models.postprocess import class_aware_nms

__all__ = ["UltralyticsAdapter"]

_PLAIN = (str, int, float, bool, type(None))
# pickled module paths and class names of older Ultralytics releases -> their current homes (read from ultralytics)
_LEGACY_MODULES = {"ultralytics.yolo.utils": "ultralytics.utils", "ultralytics.yolo.v8": "ultralytics.models.yolo",
                   "ultralytics.yolo.data": "ultralytics.data"}
_LEGACY_ATTRIBUTES = {"ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",
                      "ultralytics.utils.loss.v10DetectLoss": "ultralytics.utils.loss.E2EDetectLoss"}


def _tasks():
    """``ultralytics.nn.tasks``, or one TrtQatError naming the extra to install."""
    try:
        from ultralytics.nn import tasks
    except ImportError as exc:
        raise TrtQatError(f"model family 'ultralytics' needs the ultralytics package ({exc}); install it: "
                          "pip install trt-qat[ultralytics]") from None
    return tasks


def _is_ultralytics_module(obj) -> bool:
    return isinstance(obj, torch.nn.Module) and type(obj).__module__.split(".")[0] == "ultralytics"


def _is_plain(obj) -> bool:
    """Whether ``obj`` is plain data (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(obj, dict):
        return all(isinstance(k, _PLAIN) and _is_plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v) for v in obj)
    return isinstance(obj, _PLAIN)


#: head or model class -> the task it serves, for the message that refuses it
_OTHER_TASKS = {"Segment": "instance segmentation", "Segment26": "instance segmentation", "Pose": "pose",
                "Pose26": "pose", "OBB": "oriented boxes (OBB)", "OBB26": "oriented boxes (OBB)",
                "Classify": "classification", "ClassificationModel": "classification", "RTDETRDecoder": "RT-DETR",
                "WorldDetect": "open-vocabulary (YOLO-World)", "YOLOEDetect": "open-vocabulary (YOLOE)",
                "YOLOESegment": "open-vocabulary segmentation (YOLOE)"}


def _head(model):
    """The model's Detect head (or TrtQatError when ``model`` is not an Ultralytics detection model)."""
    tasks = _tasks()
    seq = getattr(model, "model", None)
    head = seq[-1] if isinstance(seq, torch.nn.Sequential) and len(seq) else None
    if not isinstance(model, tasks.DetectionModel) or type(head) not in (tasks.Detect, tasks.v10Detect):
        # (Segment, Pose, OBB and YOLOE heads are Detect subclasses; RT-DETR is a DetectionModel subclass)
        kind = type(head).__name__ if head is not None else type(model).__name__
        task = _OTHER_TASKS.get(kind) or _OTHER_TASKS.get(type(model).__name__)
        found = f"{'an' if task[0] in 'aeiou' else 'a'} {task} model ({kind})" if task else kind
        raise TrtQatError(f"this is {found}; the ultralytics family supports detection models with a Detect head "
                          "(YOLOv5u, YOLOv8, YOLO11, YOLO26 detect, e.g. yolov8n.pt): pass a detection checkpoint")
    return head


def _is_fused(model) -> bool:
    """Whether Ultralytics' ``fuse()`` folded the BatchNorms into the convs (``predict()`` does it on the fly, and
    ``YOLO.save()`` then writes the folded model)."""
    from ultralytics.nn.modules import Conv

    return any(isinstance(m, Conv) and not hasattr(m, "bn") for m in model.modules())


def _unshare_activations(model):
    """Give every module its own activation. Ultralytics' ``Conv.default_act`` is ONE ``nn.SiLU`` held by every
    ``Conv`` of the process (a class attribute): quantizing it would change every model built afterwards, and a
    quantizer attached to one module called from fifty places cannot tell its calls apart. The copies are stateless
    leaves (no parameters, buffers or children), so they compute the same function."""
    import copy

    from ultralytics.nn.modules import Conv

    seen = set()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            stateless = not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()) \
                and not any(True for _ in child.children())
            if stateless and (id(child) in seen or child is Conv.default_act):
                setattr(module, name, copy.deepcopy(child))
            seen.add(id(child))
    return model


def _export_mode(model):
    """Set the Detect head the way Ultralytics' exporter does, so eval mode returns the decoded tensor alone; give
    every module its own activation (:func:`_unshare_activations`).

    A head with a one-to-one branch (YOLO26, YOLOv10) infers end to end: the NMS-free ``[B, max_det, 6]`` output
    that its deployments use. The one-to-many branch then only trains (``E2ELoss`` still gets both in train mode),
    so the placement rules leave it float and the export drops it."""
    _unshare_activations(model)
    head = _head(model)
    head.export = True  # eval forward returns y, not (y, raw dict)
    head.format = "onnx"
    head.dynamic = False  # anchors are cached per input shape (rebuilt when it changes)
    head.shape = None
    if getattr(head, "one2one_cv2", None) is not None:
        head.end2end = True
    return model


@register_adapter
class UltralyticsAdapter(SequentialDetectorAdapter):
    """Ultralytics ``DetectionModel`` with a ``Detect`` head. The eval output ``output0`` is ``[B, 4 + nc, N]``:
    ``cx, cy, w, h`` in input pixels and ``nc`` class probabilities per anchor point (no objectness); with the
    one-to-one head selected (``model.end2end = True``, YOLO26/YOLOv10) it is ``[B, max_det, 6]`` instead."""

    family = "ultralytics"
    pickle_modules = ("ultralytics",)
    input_names = ("images",)
    output_names = ("output0",)

    # --- checkpoints -----------------------------------------------------------------------------------
    def recognizes(self, ckpt: dict) -> bool:
        if not isinstance(ckpt, dict):
            return False
        if super().recognizes(ckpt):
            return True
        return _is_ultralytics_module(ckpt.get("ema")) or _is_ultralytics_module(ckpt.get("model"))

    def build(self, name: str, nc: int):
        """A freshly initialised detector from an Ultralytics model yaml (``yolov8n.yaml``, ``yolo11s.yaml``, a
        path), built offline, in train mode."""
        tasks = _tasks()
        name = str(name)
        if "://" in name or not name.endswith((".yaml", ".yml")):
            raise TrtQatError(f"'{name}' is not an Ultralytics model yaml; name one such as 'yolov8n.yaml' or "
                              "'yolo11n.yaml' (trained .pt weights load as a checkpoint instead)")
        try:
            cfg = tasks.yaml_model_load(name)
        except FileNotFoundError:
            raise TrtQatError(f"Ultralytics model yaml '{name}' was not found; name one shipped with ultralytics "
                              "(yolov8n.yaml, yolo11n.yaml, yolo26n.yaml, ...) or give the path of your own") from None
        except Exception as exc:  # (a YAML syntax error)
            raise TrtQatError(f"'{name}' cannot be read as YAML ({exc.__class__.__name__}); fix it or name a model "
                              "yaml such as yolov8n.yaml") from None
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("backbone", "head")):
            raise TrtQatError(f"'{name}' is not an Ultralytics model yaml (it has no backbone and head sections; a "
                              "data.yaml goes to --data); name one such as yolov8n.yaml")
        try:
            model = tasks.DetectionModel(cfg=cfg, nc=int(nc), verbose=False)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise TrtQatError(f"Ultralytics model yaml '{name}' cannot be built ({exc.__class__.__name__}: {exc}); "
                              "check its backbone and head sections") from None
        return _export_mode(model)

    def unpickle(self, path) -> dict:  # (see ModelAdapter.load)
        tasks = _tasks()
        try:
            with tasks.temporary_modules(modules=_LEGACY_MODULES, attributes=_LEGACY_ATTRIBUTES):
                # runs the pickle (see load()), through an unpickler that resolves only classes: no os.system & co.
                ckpt = torch.load(path, map_location="cpu", weights_only=False,
                                  pickle_module=restricted_pickle(("ultralytics",)))
        except pickle.UnpicklingError as exc:
            if "not allowed" not in str(exc):
                raise TrtQatError(f"checkpoint '{path}' cannot be read (UnpicklingError); it is corrupt or not an "
                                  "Ultralytics checkpoint: re-download or re-save it") from None
            if "getattr" in str(exc):  # a bound method: fuse() sets ``conv.forward = conv.forward_fuse``
                raise TrtQatError(f"checkpoint '{path}' holds bound methods, which Ultralytics writes for a model "
                                  "fused by predict() or fuse(); trt_qat does not unpickle them (getattr can reach "
                                  "any function); pass the unfused checkpoint (training's best.pt, or YOLO(...).save() "
                                  "before any predict())") from None
            raise TrtQatError(f"checkpoint '{path}' was not loaded: {exc}; an Ultralytics checkpoint names only "
                              "classes, so this one was not written by Ultralytics (or was tampered with)") from None
        except ModuleNotFoundError as exc:
            raise TrtQatError(f"checkpoint '{path}' needs module '{exc.name}', which is not installed; it was not "
                              "written by this ultralytics release: re-save it with the ultralytics it came from, "
                              "or install that module") from None
        except Exception as exc:
            raise TrtQatError(f"checkpoint '{path}' cannot be read ({exc.__class__.__name__}); it is corrupt or not "
                              "an Ultralytics checkpoint: re-download or re-save it") from None
        if not isinstance(ckpt, dict):  # a bare pickled DetectionModel, or a YOLO() wrapper holding one
            inner = getattr(ckpt, "model", None)
            ckpt = {"model": inner if isinstance(inner, tasks.DetectionModel) else ckpt}
        return ckpt

    def from_checkpoint(self, ckpt: dict, path="<checkpoint>"):
        model = self.model_from_data(ckpt, path)  # a file trt_qat wrote (plain data)
        if model is not None:
            return model
        module = None
        if isinstance(ckpt, dict):  # Ultralytics' trainer writes the EMA under "ema", YOLO.save() under "model"
            module = ckpt["ema"] if ckpt.get("ema") is not None else ckpt.get("model")
        if not _is_ultralytics_module(module):
            raise TrtQatError(f"checkpoint '{path}' holds no Ultralytics model (no 'model'/'ema' module, nor "
                              "'model_cfg' + 'state_dict'); pass a YOLO .pt or a file trt_qat wrote for this family")
        if ckpt.get("modelopt"):
            raise TrtQatError(f"checkpoint '{path}' was quantization-aware trained by Ultralytics (modelopt state); "
                              "pass the FP32 checkpoint")
        model = module.float()
        if isinstance(ckpt.get("train_args"), dict):
            model.args = dict(ckpt["train_args"])  # the loss gains the model was trained with
        for p in model.parameters():
            p.requires_grad_(True)
        _head(model).dfl.requires_grad_(False)  # (fixed integral weights; an Identity when reg_max == 1)
        return _export_mode(model).eval()

    def save(self, model, path, **extra):
        """Write ``{"model_family", "model_cfg" (yaml, nc, names), "state_dict", **extra}`` atomically: data only,
        readable with ``torch.load(weights_only=True)``."""
        arch = self.architecture(model)
        if arch is None:
            raise TrtQatError(f"{type(model).__name__} is not an Ultralytics detection model with a plain model yaml; "
                              "save it with ultralytics itself")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_torch_save({"model_family": self.family, "model_cfg": arch, "state_dict": state, **extra}, path)
        return Path(path)

    def architecture(self, model) -> dict | None:
        tasks = _tasks()
        yaml = getattr(model, "yaml", None)
        if not isinstance(model, tasks.DetectionModel) or not isinstance(yaml, dict) or not _is_plain(yaml):
            return None
        nc = int(_head(model).nc)
        return {"yaml": copy.deepcopy(yaml), "nc": nc, "names": names_list(getattr(model, "names", None), nc),
                "fused": _is_fused(model)}

    def from_architecture(self, arch: dict):
        tasks = _tasks()
        if not isinstance(arch, dict) or not isinstance(arch.get("yaml"), dict) or "nc" not in arch:
            raise TrtQatError("the checkpoint's model_cfg is not an Ultralytics model description (yaml, nc, "
                              "names); re-create the checkpoint with trt_qat")
        yaml = copy.deepcopy(arch["yaml"])
        try:
            model = tasks.DetectionModel(cfg=yaml, ch=int(yaml.get("channels", 3)), nc=int(arch["nc"]),
                                         verbose=False)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise TrtQatError(f"the checkpoint's Ultralytics model yaml cannot be built ({exc.__class__.__name__}: "
                              f"{exc}); re-create the checkpoint with trt_qat") from None
        model.names = dict(enumerate(names_list(arch.get("names"), int(arch["nc"]))))
        if arch.get("fused"):  # the same layers as the model it describes: BN folded, unused head branch removed
            model.fuse(verbose=False)
        return _export_mode(model)

    def model_name(self, model) -> str | None:
        yaml_file = (getattr(model, "yaml", None) or {}).get("yaml_file")
        return Path(str(yaml_file)).stem if yaml_file else None

    # --- input and output --------------------------------------------------------------------------------
    def sample_input(self, imgsz: int, batch: int = 1):
        if int(imgsz) % 32:
            raise TrtQatError(f"imgsz {imgsz} is not a multiple of 32, the largest stride of Ultralytics detectors; "
                              f"use {max(32, int(imgsz) // 32 * 32)} or {(int(imgsz) // 32 + 1) * 32}")
        return super().sample_input(imgsz, batch)

    # --- training and evaluation -------------------------------------------------------------------------
    def loss_fn(self, model):
        """Ultralytics' own criterion (``model.init_criterion()``) on trt_qat batches.

        The targets ``[N, 6]`` (batch index, class, normalized ``cx, cy, w, h``) become Ultralytics' batch dict
        (``batch_idx``, ``cls``, ``bboxes``); the loss returned is their backward convention: the sum of the
        (box, cls, dfl) terms times the batch size. The last items are kept in ``loss_fn.last_items``, the criterion
        in ``loss_fn.criterion`` (built on the model's device at the first call, rebuilt when it moves; an
        ``E2ELoss`` has an ``update()`` that Ultralytics' trainer calls once per epoch).
        """
        head = _head(model)
        if any(getattr(head, name, True) is None for name in ("cv2", "cv3")):
            raise TrtQatError("this model was fused by Ultralytics (predict() or fuse() ran before it was saved), "
                              "which removed the one-to-many head branch that training needs; use the checkpoint "
                              "that training wrote (best.pt or last.pt), not a re-saved one")
        hyp = _hyperparameters(model)

        def loss_fn(net, batch):
            imgs, targets = batch[0], batch[1]
            device = next(net.parameters()).device
            if loss_fn.criterion is None or loss_fn.criterion_device != device:
                model.args = hyp  # (v8DetectionLoss reads its gains from model.args)
                loss_fn.criterion, loss_fn.criterion_device = model.init_criterion(), device
            _e2e_gains(loss_fn.criterion, loss_fn.progress)
            preds = net(imgs.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True).float()
            loss, items = loss_fn.criterion(preds, {"batch_idx": targets[:, 0], "cls": targets[:, 1:2],
                                                    "bboxes": targets[:, 2:6]})
            loss_fn.last_items = torch.stack([v.detach() for v in items.values()])
            return loss.sum()

        loss_fn.criterion = loss_fn.criterion_device = loss_fn.last_items = None
        # the fraction of training done, for E2ELoss's one-to-many/one-to-one gains: 1 (the gains Ultralytics'
        # schedule ends with) when a trained model is fine-tuned (QAT); training from scratch sets it every epoch
        loss_fn.progress = 1.0
        loss_fn.item_names = ("box", "cls", "dfl")  # (the order of Ultralytics' loss items)
        return loss_fn

    def decode(self, outputs, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300) -> list:
        """Single-label, class-aware NMS (``torchvision.ops.batched_nms``) on ``[B, 4 + nc, N]``; a one-to-one
        (end2end) output ``[B, k, 6]`` (``x1, y1, x2, y2, score, class``) is only thresholded."""

        pred = next(iter(outputs.values()))
        shape = [int(d) for d in getattr(pred, "shape", ())]
        end2end = len(shape) == 3 and shape[2] == 6 and shape[1] != 6
        if len(shape) != 3 or (shape[1] < 5 and not end2end):
            raise TrtQatError(f"the model's first output has shape {shape}, not an Ultralytics detector's "
                              "[batch, 4 + classes, anchors]; evaluate a model exported with the ultralytics family")
        pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).float()
        if end2end:  # the one-to-one head: already boxes, score, class (top-k by score)
            return [x[x[:, 4] > conf_thres][:max_det] for x in pred]
        out = []
        for x in pred.transpose(1, 2):
            scores, cls = x[:, 4:].max(1)
            keep = scores > conf_thres
            out.append(class_aware_nms(x[keep, :4], scores[keep], cls[keep], iou_thres, max_det))
        return out

    def float_layers(self, model) -> dict:
        """The DFL integral conv (``model.<i>.dfl.conv``), when the head has one (``reg_max > 1``)."""
        conv = getattr(_head(model).dfl, "conv", None)  # (the DFL is an Identity when reg_max == 1: YOLO26)
        if conv is None:
            return {}
        name = next(n for n, m in model.named_modules() if m is conv)
        return {name: "DFL integral: a fixed 1x1 conv with weights 0..reg_max-1 over a softmax (the expected box "
                      "side); INT8 on the probabilities would round the small bins to zero and bias every box, for "
                      "no speed gain (one output channel, no trained weights)"}


def _e2e_gains(criterion, progress: float) -> None:
    """Set an ``E2ELoss``'s one-to-many gain where Ultralytics' schedule has it at ``progress`` (0: the start of
    training, 1: its end; a linear decay from its initial to its final gain) and the one-to-one gain to the rest."""
    if not hasattr(criterion, "o2m_copy"):  # (not an E2ELoss: one head, no gains)
        return
    progress = min(max(float(progress), 0.0), 1.0)
    criterion.o2m = (1.0 - progress) * (criterion.o2m_copy - criterion.final_o2m) + criterion.final_o2m
    criterion.o2o = max(criterion.total - criterion.o2m, 0.0)


def _hyperparameters(model):
    """Ultralytics' default hyperparameters, overridden by the ones the model carries (its training args)."""
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    args = getattr(model, "args", None)
    given = dict(args) if isinstance(args, dict) else dict(vars(args)) if isinstance(args, SimpleNamespace) else {}
    return IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **given})
