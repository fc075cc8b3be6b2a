"""The model-adapter seam: everything the pipeline needs to know about a model family, behind one interface.

A stage never branches on the model family and never imports a family's own modules: it asks the adapter.
An adapter

* builds a model, loads one from a checkpoint and saves one (:meth:`ModelAdapter.build`, :meth:`load`,
  :meth:`save`), and rebuilds the bare architecture a quantized checkpoint was made from
  (:meth:`architecture` / :meth:`from_architecture`);
* gives the sample input and the ONNX input/output names and dynamic axes;
* gives ``loss_fn(model, batch)`` for the training loop and ``decode(outputs)`` for evaluation, which every
  backend's raw outputs go through (PyTorch, ONNX Runtime, TensorRT alike);
* gives the dataset it reads, and the layers it keeps in float on purpose, with the reason.

Families register with :func:`register_adapter` (timm's ``@register_model`` in spirit). The family modules are
imported on first use (:data:`FAMILY_MODULES`), so optional dependencies (Ultralytics, say) are only imported when
their family is asked for.
"""
from __future__ import annotations

import importlib

from trt_qat.errors import TrtQatError

__all__ = ["ModelAdapter", "SequentialDetectorAdapter", "names_list", "register_adapter", "get_adapter",
           "adapter_for_checkpoint", "adapter_for_model", "load_fp32", "family_of_pickle",
           "read_checkpoint_or_name_family", "FAMILY_MODULES", "DEFAULT_FAMILY"]

#: family name -> the module that registers its adapter (imported lazily)
FAMILY_MODULES = {"builtin": "trt_qat.models.builtin", "ultralytics": "trt_qat.models.ultralytics",
                  "yolov5": "trt_qat.models.yolov5"}
DEFAULT_FAMILY = "builtin"
_REGISTRY: dict = {}


class ModelAdapter:
    """The interface of a model family. Subclasses override what their family needs.

    Attributes:
        family (str): the registry name, stored in every checkpoint trt_qat writes.
        input_names (tuple[str]): ONNX input names, also the feed-dict keys of every runner.
        output_names (tuple[str]): ONNX output names; the first is what :meth:`decode` reads.
    """

    family = ""
    #: top-level packages whose classes this family's own (pickled) checkpoints name; how a foreign ``.pt`` is
    #: recognised without unpickling it (see :func:`trt_qat.fileio.pickle_globals`)
    pickle_modules: tuple = ()
    input_names = ("images",)
    output_names = ("output",)

    # --- checkpoints -----------------------------------------------------------------------------------
    def recognizes(self, ckpt: dict) -> bool:
        """Whether the checkpoint dict ``ckpt`` holds a model of this family."""
        return ckpt.get("model_family") == self.family

    def names_pickle(self, found) -> bool:
        """Whether a pickle whose globals are ``found`` (``"module name"`` strings, read without unpickling by
        :func:`trt_qat.fileio.pickle_globals`) holds this family's model: by default, when one of them is in a
        package of :attr:`pickle_modules`."""
        return bool({item.split(" ")[0].split(".")[0] for item in found} & set(self.pickle_modules))

    def build(self, name: str, nc: int):
        """A freshly initialised model ``name`` with ``nc`` classes (for training from scratch)."""
        raise TrtQatError(f"model family '{self.family}' cannot build models from a name; pass a checkpoint")

    def load(self, path):
        """``(model, checkpoint dict)``: the FP32 model of checkpoint ``path``, in eval mode.

        A file trt_qat wrote is read with ``torch.load(weights_only=True)`` (data only). A family whose own ``.pt``
        files are pickled modules (Ultralytics, YOLOv5) unpickles those through its :meth:`unpickle` (classes
        only: a pickle naming ``os.system`` or any other function is refused). Building those classes still runs
        their code, as every pickle does, so load only files from a source you trust; :func:`load_fp32` calls this
        only when the user names the family.
        """
        import pickle

        import torch

        from trt_qat.fileio import read_checkpoint, require_file

        if type(self).unpickle is ModelAdapter.unpickle:  # (a family with no pickled format of its own)
            ckpt = read_checkpoint(path, hint="train one with `trt-qat train` or check the path")
            return self.from_checkpoint(ckpt, path), ckpt
        path = require_file(path, "checkpoint", "check the path")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # trt_qat's own files: data only
        except pickle.UnpicklingError:  # it holds pickled code (the family's own .pt), or it is not a pickle
            ckpt = self.unpickle(path)
        except Exception as exc:
            raise TrtQatError(f"checkpoint '{path}' cannot be read ({exc.__class__.__name__}); it is corrupt or not "
                              "a PyTorch checkpoint: re-download or re-create it") from None
        return self.from_checkpoint(ckpt, path), ckpt

    def unpickle(self, path) -> dict:
        """The family's own pickled checkpoint ``path`` as a dict, through a restricted unpickler (overridden by the
        families whose checkpoints are pickled modules)."""
        raise TrtQatError(f"model family '{self.family}' reads only checkpoints trt_qat wrote; '{path}' is not one")

    def from_checkpoint(self, ckpt: dict, path="<checkpoint>"):
        """The FP32 model (eval mode) held by the checkpoint dict ``ckpt`` read from ``path``."""
        raise NotImplementedError

    def save(self, model, path, **extra):
        """Write ``model`` (FP32) to ``path`` atomically, with ``extra`` entries; returns the path."""
        raise NotImplementedError

    def model_from_data(self, ckpt: dict, path="<checkpoint>"):
        """The FP32 model (eval mode) of a checkpoint trt_qat wrote for this family (``model_cfg`` + ``state_dict``:
        plain data), or None when ``ckpt`` is not one (a family's own format, handled by :meth:`from_checkpoint`).

        Raises:
            TrtQatError: for a quantized checkpoint (this step needs the FP32 one), or weights that do not fit
                the described architecture.
        """
        if isinstance(ckpt, dict) and ckpt.get("format") == "trt_qat.quantized/1":
            raise TrtQatError(f"checkpoint '{path}' is a quantized (calibrate/qat) checkpoint; this step needs the "
                              "FP32 one")
        if not (isinstance(ckpt, dict) and "model_cfg" in ckpt and "state_dict" in ckpt):
            return None
        model = self.from_architecture(ckpt["model_cfg"])
        try:
            model.load_state_dict(ckpt["state_dict"])
        except (RuntimeError, TypeError) as exc:
            raise TrtQatError(f"checkpoint '{path}' does not match its model description "
                              f"({str(exc).splitlines()[0]}); re-create it") from None
        return model.eval()

    def architecture(self, model) -> dict | None:
        """What :meth:`from_architecture` needs to rebuild ``model``'s bare (untrained) architecture, or None when
        this family cannot describe ``model`` (it must then be passed in when loading)."""
        return None

    def from_architecture(self, arch: dict):
        """A model built from :meth:`architecture`'s dict (weights are loaded afterwards)."""
        raise NotImplementedError

    def tag(self, model, ckpt: dict | None = None):
        """Mark ``model`` as this family's (``model.trt_qat_family``, read by :func:`adapter_for_model`) and, when
        the checkpoint ``ckpt`` it came from records one, its image size (``model.trt_qat_imgsz``); returns it."""
        model.trt_qat_family = self.family
        size = checkpoint_imgsz(ckpt) if ckpt is not None else None
        if size is not None:
            model.trt_qat_imgsz = size
        return model

    def model_name(self, model) -> str | None:
        """The model's name (e.g. "yolo-n"), or None when the family has no names."""
        return None

    # --- input and output --------------------------------------------------------------------------------
    def sample_input(self, imgsz: int, batch: int = 1):
        """An example input batch of ``imgsz`` x ``imgsz`` images (for tracing, rules and export)."""
        import torch

        return torch.zeros(batch, 3, int(imgsz), int(imgsz))

    def max_stride(self, model) -> int:
        """The model's largest stride: every input side must be a multiple of it."""
        import torch

        stride = getattr(model, "stride", None)
        return int(torch.as_tensor(stride).max()) if stride is not None else 32

    def check_imgsz(self, model, imgsz: int) -> int:
        """``imgsz``, or TrtQatError when it is not a multiple of the model's largest stride."""
        stride = self.max_stride(model)
        if int(imgsz) % stride:
            lo, hi = max(stride, int(imgsz) // stride * stride), (int(imgsz) // stride + 1) * stride
            raise TrtQatError(f"imgsz {imgsz} is not a multiple of {stride}, the model's largest stride; use {lo} or "
                              f"{hi}")
        return int(imgsz)

    def dynamic_axes(self, dynamic_batch: bool = True) -> dict | None:
        """ONNX ``dynamic_axes`` for export: the batch dimension of every input and output, or None."""
        if not dynamic_batch:
            return None
        return {name: {0: "batch"} for name in (*self.input_names, *self.output_names)}

    # --- training and evaluation -------------------------------------------------------------------------
    def loss_fn(self, model):
        """A ``loss_fn(model, batch) -> scalar`` for the training loop; ``model`` is in train mode."""
        raise TrtQatError(f"model family '{self.family}' has no training loss")

    def distill_output_loss(self, student, teacher):
        """A distillation loss between the student's and the teacher's raw (train-mode) head outputs, suited to what
        they mean."""
        raise TrtQatError(f"model family '{self.family}' has no output distillation; use --distill feature")

    def decode(self, outputs, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300) -> list:
        """Detections per image from a runner's raw outputs (a name -> array mapping, in output order).

        Returns:
            list[Tensor]: one ``[n, 6]`` tensor per image: ``x1, y1, x2, y2`` in input (letterboxed) pixels, score,
            class index.
        """
        raise NotImplementedError

    def dataset(self, data_yaml, split: str, imgsz: int, augment: bool = False, max_images=None):
        """The detection dataset this family trains and evaluates on."""
        from trt_qat.data.yolo import YoloDataset

        return YoloDataset(data_yaml, split=split, imgsz=imgsz, augment=augment, max_images=max_images)

    def num_classes(self, model) -> int | None:
        """The number of classes ``model`` predicts, or None when unknown."""
        return None

    def class_names(self, model) -> list | None:
        """The class names ``model`` was trained with, or None when it does not carry them."""
        return None

    def check_dataset(self, model, dataset, what: str = "the dataset") -> None:
        """Refuse ``dataset`` when its ``nc`` or ``names`` disagree with ``model``'s (mAP would be silently wrong).

        Raises:
            TrtQatError: naming both class counts (or the first differing name) and the fix.
        """
        nc, names = self.num_classes(model), self.class_names(model)
        have_nc, have_names = getattr(dataset, "nc", None), getattr(dataset, "names", None)
        if nc is not None and have_nc is not None and int(have_nc) != int(nc):
            raise TrtQatError(f"{what} has nc={have_nc} classes but the model predicts {nc}; point --data at the "
                              "data.yaml the model was trained on (or fix its nc/names)")
        if names and have_names and list(names) != list(have_names):
            diff = next(i for i, (a, b) in enumerate(zip(names, have_names)) if a != b)
            raise TrtQatError(f"{what} names class {diff} '{have_names[diff]}' but the model calls it '{names[diff]}'; "
                              "use the data.yaml the model was trained on")

    def float_layers(self, model) -> dict:
        """``{module name: reason}`` of the layers this family keeps in float on purpose."""
        return {}

    def float_skip_patterns(self, model) -> list:
        """:meth:`float_layers` as ``quant.skip`` regexes (each matches exactly that module)."""
        import re

        return [f"^{re.escape(name)}$" for name in self.float_layers(model)]


def names_list(names, nc: int) -> list:
    """``nc`` class names as strings, from a ``{index: name}`` dict or a sequence (indices where none is given)."""
    if isinstance(names, dict):
        return [str(names.get(i, i)) for i in range(nc)]
    return [str(n) for n in names] if names is not None else [str(i) for i in range(nc)]


class SequentialDetectorAdapter(ModelAdapter):
    """What the families whose model is a YOLO-style ``nn.Sequential`` of layers (``model.model``) ending in the
    detection head (``nc``), with the class names in ``model.names`` (Ultralytics, YOLOv5), share."""

    def num_classes(self, model) -> int | None:
        import torch

        seq = getattr(model, "model", None)
        head = seq[-1] if isinstance(seq, torch.nn.Sequential) else None
        return int(head.nc) if head is not None and hasattr(head, "nc") else None

    def class_names(self, model) -> list | None:
        nc = self.num_classes(model)
        if nc is None or getattr(model, "names", None) is None:
            return None
        names = names_list(model.names, nc)
        return None if names == [str(i) for i in range(nc)] else names  # placeholders of a freshly built model


def checkpoint_imgsz(ckpt) -> int | None:
    """The image size a checkpoint records: trt_qat's ``imgsz`` (quantized checkpoints), else its training
    arguments' ``imgsz`` (``trt-qat train`` and Ultralytics both keep them in ``train_args``); None when it has none."""
    if not isinstance(ckpt, dict):
        return None
    args = ckpt.get("train_args")
    size = ckpt.get("imgsz") or (args.get("imgsz") if isinstance(args, dict) else None)
    if isinstance(size, (list, tuple)) and size:
        size = max(size)
    return int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0 else None


def register_adapter(cls):
    """Class decorator: register an adapter class under its ``family``, with pruned-model support added to its
    checkpoint load and save path (:func:`trt_qat.models.reshape.support_pruned`)."""
    from trt_qat.models.reshape import support_pruned

    if not cls.family:
        raise TypeError(f"{cls.__name__} has no family name")
    _REGISTRY[cls.family] = support_pruned(cls)()
    return cls


def get_adapter(family: str | None = None) -> ModelAdapter:
    """The adapter of ``family`` (the built-in detector's when None)."""
    family = family or DEFAULT_FAMILY
    if family not in _REGISTRY and family in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[family])
    if family not in _REGISTRY:
        raise TrtQatError(f"unknown model family '{family}'; known families: {', '.join(sorted(FAMILY_MODULES))}")
    return _REGISTRY[family]


def adapter_for_checkpoint(ckpt: dict, family: str | None = None) -> ModelAdapter:
    """The adapter for checkpoint dict ``ckpt``: ``family`` when given, else the one that recognises it.

    trt_qat's own checkpoints name their family; a checkpoint that names none is the built-in detector's (older
    trt_qat files).
    """
    if family:
        return get_adapter(family)
    named = ckpt.get("model_family") if isinstance(ckpt, dict) else None
    if named:
        return get_adapter(named)
    for name in FAMILY_MODULES:
        adapter = get_adapter(name)
        if adapter.recognizes(ckpt):
            return adapter
    return get_adapter(DEFAULT_FAMILY)


def adapter_for_model(model) -> ModelAdapter:
    """The adapter of an instantiated model: the family it was built or loaded by (``model.trt_qat_family``)."""
    return get_adapter(getattr(model, "trt_qat_family", None))


def load_fp32(path, family: str | None = None):
    """Load the FP32 model of checkpoint ``path`` through its family's adapter.

    Args:
        path (str | Path): the checkpoint.
        family (str | None): the model family, whose adapter then reads the file (for a pickled foreign format
            this runs its code: the caller asked for it). Defaults to the family a trt_qat checkpoint names.

    Returns:
        tuple[nn.Module, ModelAdapter]: the model (eval mode) and its adapter.
    """
    if family:
        adapter = get_adapter(family)
        return adapter.tag(*adapter.load(path)), adapter
    ckpt = read_checkpoint_or_name_family(path)
    adapter = adapter_for_checkpoint(ckpt, family)
    return adapter.tag(adapter.from_checkpoint(ckpt, path), ckpt), adapter


def read_checkpoint_or_name_family(path) -> dict:
    """trt_qat's data-only read of ``path``; when it refuses a pickle that one model family writes (an Ultralytics
    ``.pt``), the error names that family and the flag that loads it: unpickling runs code, so it happens only when
    the user asks for it (``--model-family`` / ``model.family``)."""
    from trt_qat.fileio import read_checkpoint

    try:
        return read_checkpoint(path, hint="train one with `trt-qat train` or check the path")
    except TrtQatError:
        named = family_of_pickle(path)
        if named is None:
            raise
        raise TrtQatError(f"'{path}' is a {named} checkpoint, a pickle: loading it runs the code it holds; if you "
                          f"trust its source, pass --model-family {named} (model.family: {named} in a run config)"
                          ) from None


def family_of_pickle(path) -> str | None:
    """The family whose :attr:`ModelAdapter.pickle_modules` the pickle in ``path`` names (read without unpickling),
    or None."""
    from trt_qat.fileio import pickle_globals

    found = pickle_globals(path)
    for name in FAMILY_MODULES:
        if get_adapter(name).names_pickle(found):
            return name
    return None
