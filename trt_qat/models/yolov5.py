"""Classic YOLOv5 detectors (the ultralytics/yolov5 repository: ``models.yolo.DetectionModel`` with the anchor-based
``Detect`` head) behind the model-adapter seam.

* The classes are the repository's own, imported only when needed (:func:`yolov5_code`), from a clone on
  ``sys.path`` (top-level ``models``/``utils``) or else the PyPI ``yolov5`` package (``yolov5.models.yolo``, ...).
  A checkpoint's module paths (``models.yolo``, ``models.common``, ``utils.*``, or ``yolov5.models...`` when that
  package trained it) are mapped to the code that is there while unpickling.
* ``.pt`` files written by yolov5's ``train.py`` are pickles of whole modules (``{"model": ..., "ema": ...}``);
  :meth:`YoloV5Adapter.load` is the only place that unpickles one, through :func:`trt_qat.fileio.restricted_pickle`
  (classes only), and only when the user names the family (``--model-family yolov5``). Files trt_qat writes hold
  data only (the model yaml, ``nc``, class names, loss gains and a ``state_dict``).
* In eval mode the ``Detect`` head runs in yolov5's export mode and the model returns ONE tensor ``[B, N, 5 + nc]``:
  ``cx, cy, w, h`` in input pixels, objectness, class probabilities (the ONNX output ``output0``).
* Training calls the repository's own ``utils.loss.ComputeLoss`` with the model's ``hyp`` (:func:`default_hyp`).

Ultralytics' YOLOv5u checkpoints are not this family: they are Ultralytics models (``--model-family ultralytics``).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from trt_qat.errors import TrtQatError
from trt_qat.fileio import atomic_torch_save, restricted_pickle
from trt_qat.models.adapter import SequentialDetectorAdapter, names_list, register_adapter
from trt_qat.models.postprocess import class_aware_nms

__all__ = ["YoloV5Adapter", "yolov5_code", "MODEL_MODULES"]

#: where the repository's model classes live, as a checkpoint names them (a clone's, and the PyPI package's)
MODEL_MODULES = ("models.yolo", "yolov5.models.yolo")
_HOW = "pip install yolov5, or put your clone of github.com/ultralytics/yolov5 on PYTHONPATH (=/path/to/yolov5)"
#: the loss entries of yolov5's data/hyps/hyp.scratch-low.yaml (used when neither the model nor the code has them)
_LOSS_HYP = {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0,
             "label_smoothing": 0.0}
_PLAIN = (str, int, float, bool, type(None))


# ------------------------------------------------------------------------------------------- the repository's code
def _spec(name: str):
    with contextlib.suppress(ImportError, ValueError):  # blocked, or a half-imported module
        return importlib.util.find_spec(name)


def _clone_root() -> Path | None:
    """The root of a yolov5 clone whose ``models``/``utils`` are top-level packages, or None. The PyPI package's own
    directory does not count: its ``models/yolo.py`` appends that directory to ``sys.path``, which makes a second
    copy of its classes importable as ``models.*``."""
    spec = _spec("models")
    if spec is None or not spec.origin or not spec.submodule_search_locations:  # absent, or a namespace package
        return None
    root = Path(spec.origin).resolve().parent.parent
    if not (root / "models" / "yolo.py").is_file() or not (root / "utils" / "loss.py").is_file():
        return None
    package = _spec("yolov5")
    if package is not None and any(Path(p).resolve() == root for p in package.submodule_search_locations or ()):
        return None
    utils = _spec("utils")  # a name many projects use: the clone's must be the one that imports
    if utils is None or not utils.origin or Path(utils.origin).resolve().parent.parent != root:
        raise TrtQatError(f"the yolov5 clone at '{root}' is shadowed: 'import utils' finds "
                          f"{utils.origin if utils is not None else 'nothing'}; put the clone first on PYTHONPATH, "
                          "or run from a directory without a utils package")
    return root


def _import(prefix: str, root: Path, what: str, fix: str) -> SimpleNamespace:
    try:
        yolo = importlib.import_module(prefix + "models.yolo")
        loss = importlib.import_module(prefix + "utils.loss")
    except ImportError as exc:  # the code is there, one of its own dependencies is not
        if getattr(exc, "name", None) == "pkg_resources":
            fix = "it imports pkg_resources, which setuptools>=81 no longer ships: pip install 'setuptools<81'"
        raise TrtQatError(f"model family 'yolov5' found {what} but cannot import it ({exc}); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - whatever that code raises while importing
        raise TrtQatError(f"model family 'yolov5' found {what} but importing it failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); {fix}") from None
    if not all(hasattr(yolo, n) for n in ("Detect", "DetectionModel")) or not hasattr(loss, "ComputeLoss"):
        raise TrtQatError(f"{what} has no models.yolo.DetectionModel / Detect and utils.loss.ComputeLoss, so it is "
                          f"not the ultralytics/yolov5 code; {_HOW}")
    return SimpleNamespace(yolo=yolo, loss=loss, prefix=prefix, root=root, what=what)


def yolov5_code() -> SimpleNamespace:
    """The ultralytics/yolov5 code, a clone on ``sys.path`` first, else the PyPI ``yolov5`` package: ``yolo`` (its
    ``models.yolo``), ``loss`` (``utils.loss``), ``prefix`` (``""``, or ``"yolov5."`` for the package), ``root`` (the
    directory of ``models/`` and ``data/``) and ``what`` (in words). TrtQatError, naming both ways, when neither is."""
    root = _clone_root()
    if root is not None:
        return _import("", root, f"the yolov5 clone at '{root}'",
                       f"install its requirements: pip install -r {root / 'requirements.txt'}")
    spec = _spec("yolov5")
    if spec is None or not spec.origin or not spec.submodule_search_locations:
        raise TrtQatError("model family 'yolov5' needs the code of the ultralytics/yolov5 repository, and neither "
                          f"a clone nor the yolov5 package is importable; {_HOW}")
    return _import("yolov5.", Path(spec.origin).resolve().parent, "the yolov5 package",
                   "install what it needs (pip install yolov5), or use a clone of the repository on PYTHONPATH")


def _remap(module: str, prefix: str) -> str:
    """A checkpoint's module path, mapped to the code that is importable (see the module docstring)."""
    parts = module.split(".")
    if prefix and parts[0] in ("models", "utils"):
        return prefix + module
    if not prefix and parts[0] == "yolov5" and len(parts) > 1 and parts[1] in ("models", "utils"):
        return ".".join(parts[1:])
    return module


def _pickle_module(prefix: str):
    """:func:`restricted_pickle` (classes only) for yolov5's packages, with :func:`_remap` applied to every module
    path the pickle names."""
    base = restricted_pickle(("models", "utils", "yolov5"))

    class Unpickler(base.Unpickler):
        def find_class(self, module, name):
            return super().find_class(_remap(module, prefix), name)

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return SimpleNamespace(Unpickler=Unpickler, load=load, __name__=base.__name__)


@contextlib.contextmanager
def _quiet(code):
    """yolov5 logs a model table and more at INFO while building; keep that to warnings."""
    loggers = [lg for lg in (getattr(code.yolo, "LOGGER", None), logging.getLogger("yolov5")) if lg is not None]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ----------------------------------------------------------------------------------------------- model helpers
def _is_yolov5_module(obj) -> bool:
    return isinstance(obj, torch.nn.Module) and type(obj).__module__ in MODEL_MODULES


def _is_plain(obj) -> bool:  # (what torch.load(weights_only=True) reads back)
    if isinstance(obj, dict):
        return all(isinstance(k, _PLAIN) and _is_plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v) for v in obj)
    return isinstance(obj, _PLAIN)


def _head(model, code=None):
    """The model's ``Detect`` head (or TrtQatError when ``model`` is not a YOLOv5 detection model)."""
    code = code or yolov5_code()
    head = model.model[-1] if isinstance(model, code.yolo.DetectionModel) and len(model.model) else None
    if type(head) is not code.yolo.Detect:  # (a Segment head is a Detect subclass: not this adapter's task)
        kind = type(head).__name__ if head is not None else type(model).__name__
        raise TrtQatError(f"the yolov5 adapter handles YOLOv5 detection models (a Detect head), not {kind}; pass a "
                          "yolov5 detection checkpoint (yolov5s.pt, ...) or model yaml (yolov5n.yaml, ...)")
    return head


def _one_output(module, args, output):
    """Forward hook of the Detect head: in export mode its eval output is ``(y,)``; the model returns ``y``."""
    if not module.training and isinstance(output, tuple) and len(output) == 1:
        return output[0]
    return None


def _unshare_activations(model, shared):
    """Give every module its own stateless leaf (activation). yolov5's ``Conv.default_act`` is ONE ``nn.SiLU`` held
    by every ``Conv`` of the process (a class attribute, and one object in a pickle): a quantizer attached to a
    module called from fifty places cannot tell its calls apart. The copies compute the same function."""
    seen = set()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            stateless = not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()) \
                and not any(True for _ in child.children())
            if stateless and (id(child) in seen or child is shared):
                setattr(module, name, copy.deepcopy(child))
            seen.add(id(child))
    return model


def _export_mode(model, code=None):
    """Set the Detect head as yolov5's exporter does, and make the eval output one tensor (:func:`_one_output`)."""
    code = code or yolov5_code()
    head = _head(model, code)
    _unshare_activations(model, getattr(getattr(code.yolo, "Conv", None), "default_act", None))
    head.export = True  # eval forward returns (y,), not (y, raw list)
    head.dynamic = False  # the grid is cached per input shape (rebuilt when it changes)
    if not isinstance(head.anchor_grid, list):  # a buffer in checkpoints of yolov5 before v6.0
        delattr(head, "anchor_grid")
    head.grid, head.anchor_grid = [torch.empty(0)] * head.nl, [torch.empty(0)] * head.nl
    for m in model.modules():  # checkpoints pickled before torch 1.11
        if isinstance(m, torch.nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    if _one_output not in head._forward_hooks.values():
        head.register_forward_hook(_one_output)
    return model


def default_hyp(code, nl: int, nc: int, imgsz: int) -> dict:
    """The loss gains yolov5's ``train.py`` gives a model trained from scratch: the code's
    ``data/hyps/hyp.scratch-low.yaml``, ``box``/``cls``/``obj`` scaled to the layers, classes and image size."""
    import yaml

    hyp = dict(_LOSS_HYP)
    path = Path(code.root) / "data" / "hyps" / "hyp.scratch-low.yaml"
    if path.is_file():
        with contextlib.suppress(OSError, yaml.YAMLError, TypeError, ValueError):
            hyp.update({k: float(v) for k, v in (yaml.safe_load(path.read_text()) or {}).items()
                        if isinstance(v, (int, float))})
    hyp["box"] *= 3 / nl
    hyp["cls"] *= nc / 80 * 3 / nl
    hyp["obj"] *= (imgsz / 640) ** 2 * 3 / nl
    return hyp


# ------------------------------------------------------------------------------------------------- the adapter
@register_adapter
class YoloV5Adapter(SequentialDetectorAdapter):
    """ultralytics/yolov5 ``DetectionModel`` with the anchor-based ``Detect`` head. The eval output ``output0`` is
    ``[B, N, 5 + nc]``: ``cx, cy, w, h`` in input pixels, objectness and ``nc`` class probabilities per anchor."""

    family = "yolov5"
    input_names = ("images",)
    output_names = ("output0",)

    # --- checkpoints -----------------------------------------------------------------------------------
    def names_pickle(self, found) -> bool:
        """A model class and the ``Detect`` head of ``(yolov5.)models.yolo``: not YOLOv7's (``IDetect``) nor
        segmentation checkpoints (``Segment``)."""
        classes = {item.replace(" ", ".") for item in found}
        return any({f"{m}.Detect"} <= classes and classes & {f"{m}.DetectionModel", f"{m}.Model"}
                   for m in MODEL_MODULES)

    def recognizes(self, ckpt: dict) -> bool:
        if not isinstance(ckpt, dict):
            return False
        return super().recognizes(ckpt) or _is_yolov5_module(ckpt.get("ema")) or _is_yolov5_module(ckpt.get("model"))

    def build(self, name: str, nc: int):
        """A freshly initialised detector from a yolov5 model yaml (``yolov5n.yaml`` from the code's ``models/``,
        or a path), built offline, in train mode."""
        code = yolov5_code()
        name = str(name)
        if "://" in name or not name.endswith((".yaml", ".yml")):
            raise TrtQatError(f"'{name}' is not a yolov5 model yaml; name one such as 'yolov5n.yaml' or 'yolov5s.yaml' "
                              "(trained .pt weights load as a checkpoint instead)")
        path = Path(name)
        if not path.is_file():
            found = [p for p in (code.root / "models" / name, code.root / "models" / "hub" / name) if p.is_file()]
            if not found:
                raise TrtQatError(f"yolov5 model yaml '{name}' was not found; name one shipped with {code.what} "
                                  "(yolov5n.yaml, yolov5s.yaml, ...) or give the path of your own")
            path = found[0]
        with _quiet(code):
            model = code.yolo.DetectionModel(cfg=str(path), ch=3, nc=int(nc))
        model.nc = int(nc)
        return _export_mode(model, code)

    def unpickle(self, path) -> dict:  # (see ModelAdapter.load)
        code = yolov5_code()
        try:
            with _quiet(code):  # runs the pickle (see load()), resolving only classes: no os.system & co.
                ckpt = torch.load(path, map_location="cpu", weights_only=False,
                                  pickle_module=_pickle_module(code.prefix))
        except (ModuleNotFoundError, AttributeError) as exc:
            raise TrtQatError(f"checkpoint '{path}' names code that {code.what} does not have ({exc}); it was "
                              "written by another yolov5 version or another repository (YOLOv7, ...): load it with "
                              "the code that wrote it") from None
        except Exception as exc:
            if isinstance(exc, pickle.UnpicklingError) and "not allowed" in str(exc):
                raise TrtQatError(f"checkpoint '{path}' was not loaded: {exc}; a yolov5 checkpoint names only "
                                  "classes, so this one was not written by yolov5 (or was tampered with)") from None
            raise TrtQatError(f"checkpoint '{path}' cannot be read ({exc.__class__.__name__}); it is corrupt or not "
                              "a yolov5 checkpoint: re-download or re-save it") from None
        ckpt = ckpt if isinstance(ckpt, dict) else {"model": ckpt}  # (a bare pickled DetectionModel)
        if isinstance(ckpt.get("opt"), dict) and "imgsz" in ckpt["opt"]:  # train.py's image size, where trt_qat looks
            ckpt.setdefault("train_args", {"imgsz": ckpt["opt"]["imgsz"]})
        return ckpt

    def from_checkpoint(self, ckpt: dict, path="<checkpoint>"):
        model = self.model_from_data(ckpt, path)  # a file trt_qat wrote (plain data)
        if model is not None:
            return model
        module = None
        if isinstance(ckpt, dict):  # train.py writes the EMA under "ema" while training; a finished run, "model"
            module = ckpt["ema"] if ckpt.get("ema") is not None else ckpt.get("model")
        if not _is_yolov5_module(module):
            raise TrtQatError(f"checkpoint '{path}' holds no YOLOv5 model (no 'model'/'ema' module of the "
                              "ultralytics/yolov5 repository, nor 'model_cfg' + 'state_dict'); pass a yolov5 .pt or "
                              "a file trt_qat wrote for this family (Ultralytics YOLOv5u files are "
                              "--model-family ultralytics)")
        code = yolov5_code()
        model = module.float()
        for p in model.parameters():  # (train.py's final checkpoint freezes them)
            p.requires_grad_(True)
        return _export_mode(model, code).eval()

    def save(self, model, path, **extra):
        """Write ``{"model_family", "model_cfg" (yaml, nc, names, hyp), "state_dict", **extra}`` atomically: data
        only, readable with ``torch.load(weights_only=True)``."""
        arch = self.architecture(model)
        if arch is None:
            raise TrtQatError(f"{type(model).__name__} is not a YOLOv5 detection model with a plain model yaml; "
                              "save it with yolov5 itself")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_torch_save({"model_family": self.family, "model_cfg": arch, "state_dict": state, **extra}, path)
        return Path(path)

    def architecture(self, model) -> dict | None:
        yaml = getattr(model, "yaml", None)
        if not _is_yolov5_module(model) or not isinstance(yaml, dict) or not _is_plain(yaml):
            return None
        nc = int(_head(model).nc)
        arch = {"yaml": copy.deepcopy(yaml), "nc": nc, "names": names_list(getattr(model, "names", None), nc),
                "name": self.model_name(model)}
        hyp = getattr(model, "hyp", None)
        if isinstance(hyp, dict) and _is_plain(hyp):
            arch["hyp"] = dict(hyp)
        return arch

    def from_architecture(self, arch: dict):
        if not isinstance(arch, dict) or not isinstance(arch.get("yaml"), dict) or "nc" not in arch:
            raise TrtQatError("the checkpoint's model_cfg is not a yolov5 model description (yaml, nc, names); "
                              "re-create the checkpoint with trt_qat")
        code = yolov5_code()
        yaml, nc = copy.deepcopy(arch["yaml"]), int(arch["nc"])
        try:
            with _quiet(code):
                model = code.yolo.DetectionModel(cfg=yaml, ch=int(yaml.get("ch", 3)), nc=nc)
        except (KeyError, TypeError, ValueError, IndexError, NameError) as exc:
            raise TrtQatError(f"the checkpoint's yolov5 model yaml cannot be built ({exc.__class__.__name__}: "
                              f"{exc}); re-create the checkpoint with trt_qat") from None
        model.nc, model.names = nc, names_list(arch.get("names"), nc)
        if isinstance(arch.get("hyp"), dict):
            model.hyp = dict(arch["hyp"])
        if arch.get("name"):
            model.yaml_file = f"{arch['name']}.yaml"
        return _export_mode(model, code)

    def model_name(self, model) -> str | None:
        yaml_file = getattr(model, "yaml_file", None)
        return Path(str(yaml_file)).stem if yaml_file else None

    # --- input and output --------------------------------------------------------------------------------
    def sample_input(self, imgsz: int, batch: int = 1, model=None):
        """Zeros ``[batch, 3, imgsz, imgsz]``; ``imgsz`` must be a multiple of the largest stride (``model``'s when
        given, else 32, that of the P5 models)."""
        stride = int(torch.as_tensor(model.stride).max()) if model is not None else 32
        if int(imgsz) % stride or int(imgsz) <= 0:
            raise TrtQatError(f"imgsz {imgsz} is not a multiple of {stride}, the largest stride of "
                              f"{'this model' if model is not None else 'YOLOv5 P5 detectors (64 for P6 ones)'}; use "
                              f"{max(stride, int(imgsz) // stride * stride)} or {(int(imgsz) // stride + 1) * stride}")
        return super().sample_input(imgsz, batch)

    # --- training and evaluation -------------------------------------------------------------------------
    def loss_fn(self, model):
        """yolov5's own ``utils.loss.ComputeLoss`` on trt_qat batches, whose targets ``[N, 6]`` (image, class,
        normalized ``cx, cy, w, h``) are yolov5's format. Gains: ``model.hyp`` (a trained checkpoint's) over
        :func:`default_hyp` at the first batch's size. The loss is yolov5's (box + obj + cls) * batch size; the items
        are kept in ``loss_fn.last_items``, the criterion (rebuilt when the model moves) in ``loss_fn.criterion``."""
        code = yolov5_code()
        head = _head(model, code)

        def loss_fn(net, batch):
            imgs, targets = batch[0], batch[1]
            device = next(net.parameters()).device
            if loss_fn.criterion is None or loss_fn.criterion_device != device:
                given = model.hyp if isinstance(getattr(model, "hyp", None), dict) else {}
                model.hyp = {**default_hyp(code, int(head.nl), int(head.nc), int(imgs.shape[-1])), **given}
                loss_fn.criterion, loss_fn.criterion_device = code.loss.ComputeLoss(model), device
            preds = net(imgs.to(device, non_blocking=True))
            loss, items = loss_fn.criterion(preds, targets.to(device, non_blocking=True).float())
            loss_fn.last_items = items.detach()
            return loss.sum()

        loss_fn.criterion = loss_fn.criterion_device = loss_fn.last_items = None
        return loss_fn

    def decode(self, outputs, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300) -> list:
        """Score ``objectness * class probability`` (the best class of each box), then class-aware NMS
        (``torchvision.ops.batched_nms``) on ``[B, N, 5 + nc]``."""
        pred = next(iter(outputs.values()))
        shape = [int(d) for d in getattr(pred, "shape", ())]
        if len(shape) != 3 or shape[2] < 6:
            raise TrtQatError(f"the model's first output has shape {shape}, not a YOLOv5 detector's "
                              "[batch, anchors, 5 + classes]; evaluate a model exported with the yolov5 family")
        pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).float()
        out = []
        for x in pred:
            x = x[x[:, 4] > conf_thres]
            scores, cls = (x[:, 5:] * x[:, 4:5]).max(1)
            keep = scores > conf_thres
            out.append(class_aware_nms(x[keep, :4], scores[keep], cls[keep], iou_thres, max_det))
        return out

    def float_layers(self, model) -> dict:
        return {}  # none: every conv, the Detect head's 1x1 output convs included, runs in INT8 (lint: 60/60)
