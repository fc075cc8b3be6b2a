"""Configuration dataclasses, validated on creation, and the YAML pipeline config that maps onto them.

Each stage has one dataclass. A YAML pipeline config has one section per dataclass (``quant``, ``calib``,
``qat`` (with ``qat.distill``), ``export``, ``data``, ``model``, ``run``); unknown keys are refused with the list of
valid ones. (A little over 400 lines on purpose: every dataclass of the YAML schema and its checks in one place.)
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from trt_qat.config_variants import PruneConfig, SparsityConfig
from trt_qat.errors import TrtQatError

__all__ = ["QuantConfig", "CalibConfig", "QATConfig", "DistillConfig", "ExportConfig",
           "DataConfig", "ModelConfig", "RunConfig", "PruneConfig", "SparsityConfig",
           "PipelineConfig", "load_pipeline_config", "from_dict"]

CALIB_METHODS = ("max", "percentile", "mse", "entropy")


#: input sizes trt_qat accepts: a multiple of the detectors' largest stride, within what a GPU can hold
MIN_IMGSZ, MAX_IMGSZ = 32, 8192
#: the largest learning rate accepted: larger ones only diverge (fine-tuning uses about 1e-4)
MAX_LR = 1.0


def _check(cond: bool, msg: str):
    if not cond:
        raise TrtQatError(msg)


def check_imgsz(value, key: str = "imgsz") -> int:
    """``value`` if it is an input size trt_qat takes: an integer multiple of 32 in [32, 8192]."""
    _check(isinstance(value, int) and not isinstance(value, bool) and MIN_IMGSZ <= value <= MAX_IMGSZ
           and value % 32 == 0, f"{key}={value!r} must be a multiple of 32 between {MIN_IMGSZ} and {MAX_IMGSZ} "
           "(e.g. 640)")
    return value


def check_lr(value, key: str = "lr") -> float:
    """``value`` if it is a usable learning rate: finite, > 0 and at most 1."""
    _check(isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= MAX_LR,
           f"{key}={value!r} must be a number in (0, {MAX_LR:g}]; fine-tuning uses about 1e-4")
    return float(value)


def check_device(device):
    """``device`` as a ``torch.device`` once it is known to be usable here; None (or "") stays None.

    Raises:
        TrtQatError: for a malformed name, CUDA on a machine without it, or a CUDA index that is not visible.
    """
    if device is None or str(device) == "":
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TrtQatError(f"unknown device '{device}'; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise TrtQatError(f"device '{device}' is not supported; trt_qat runs on 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrtQatError(f"device '{device}' requested but CUDA is not available here; pass --device cpu or "
                              "leave --device out")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrtQatError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible "
                              "(check CUDA_VISIBLE_DEVICES)")
    return dev


#: per-channel QuantizeLinear (the ``axis`` attribute) needs opset 13
MIN_OPSET = 13


def _max_opset() -> int:
    """The newest opset the TorchScript exporter (the one that traces TensorQuantizer) writes."""
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):
        return 20


def check_opset(opset: int) -> int:
    """``opset`` if trt_qat can export Q/DQ with it: per-channel QuantizeLinear needs 13, and the TorchScript
    exporter writes up to its own maximum."""
    if opset < MIN_OPSET:
        raise TrtQatError(f"opset {opset} is too old: per-channel QuantizeLinear needs the 'axis' attribute of opset "
                          f"{MIN_OPSET}; use --opset {MIN_OPSET} or newer (17 recommended)")
    top = _max_opset()
    if opset > top:
        raise TrtQatError(f"opset {opset} is newer than this torch's ONNX exporter writes ({top}); use --opset "
                          f"{top} or lower (17 recommended)")
    return opset


@dataclass
class QuantConfig:
    """How a model is instrumented.

    Args:
        num_bits (int): quantization bits. Defaults to 8.
        per_channel_weights (bool): per-output-channel weight scales (axis 0; axis 1 for ConvTranspose).
            Defaults to True.
        skip (list[str]): regexes on module names left in float. Defaults to none.
        quantize_pooling (bool): quantize MaxPool/AvgPool inputs. Defaults to True.
        rules (bool): apply TensorRT placement rules (shared scales at Concat/MaxPool/Add/Resize, quantized
            residual Adds). Defaults to True.
        min_channels (int | None): skip convs with fewer input channels unless a multiple of 8. Defaults to None.
        num_bins (int): histogram bins for activation calibration. Defaults to 2048.
    """

    num_bits: int = 8
    per_channel_weights: bool = True
    skip: list = field(default_factory=list)
    quantize_pooling: bool = True
    rules: bool = True
    min_channels: int | None = None
    num_bins: int = 2048

    def __post_init__(self):
        _check(self.num_bits == 8, f"quant.num_bits={self.num_bits} is not supported; TensorRT Q/DQ INT8 needs 8")
        _check(isinstance(self.skip, (list, tuple)), "quant.skip must be a list of regexes")
        self.skip = list(self.skip)
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise TrtQatError(f"quant.skip pattern {pattern!r} is not a valid regex ({exc}); escape special "
                                  "characters, e.g. 'head\\.cls'") from None
        _check(self.num_bins >= 256, f"quant.num_bins={self.num_bins} is too small; use at least 256 (2048 is usual)")
        _check(self.min_channels is None or self.min_channels > 0, "quant.min_channels must be positive or null")


@dataclass
class CalibConfig:
    """Calibration (PTQ initialisation).

    Args:
        method (str): one of max, percentile, mse, entropy. Defaults to "percentile".
        percentile (float): for method "percentile". Defaults to 99.99.
        num_batches (int | None): batches to collect statistics over; None means the whole iterable.
        device (str | None): where to run; None picks the model's device.
    """

    method: str = "percentile"
    percentile: float = 99.99
    num_batches: int | None = None
    device: str | None = None

    def __post_init__(self):
        _check(self.method in CALIB_METHODS,
               f"unknown calibration method '{self.method}'; choose one of {', '.join(CALIB_METHODS)}")
        _check(0 < self.percentile <= 100, f"percentile {self.percentile} must be in (0, 100]")
        _check(self.num_batches is None or self.num_batches > 0, "calib.num_batches must be positive or null")
        check_device(self.device)


DISTILL_MODES = ("feature", "output", "both")


@dataclass
class DistillConfig:
    """Distillation QAT: the FP32 model teaches its quantized copy (:mod:`trt_qat.train.distill`).

    Args:
        mode (str | None): "feature", "output" or "both"; None turns distillation off. Defaults to None.
        weight (float): the distillation term's weight next to the detection loss. Defaults to 1.0.
        blocks (list[str] | None): module names for the feature loss. Defaults to every top-level block.
        label_free (bool): the pipeline also runs label-free distillation QAT (no label is read). Defaults to False.
        images (str | None): label-free images (a directory or .txt list). Defaults to the train split's images
            (read as bare images: no label file is opened).
        label_free_optimizer (str): the label-free run's optimizer. Defaults to "adamw" (yolov7_qat's recipe uses
            Adam at about 1e-5).
        label_free_lr (float): the label-free run's peak learning rate. Defaults to 3e-5.
    """

    mode: str | None = None
    weight: float = 1.0
    blocks: list | None = None
    label_free: bool = False
    images: str | None = None
    label_free_optimizer: str = "adamw"
    label_free_lr: float = 3e-5

    def __post_init__(self):
        _check(self.mode is None or self.mode in DISTILL_MODES,
               f"qat.distill.mode '{self.mode}' unknown; use one of {', '.join(DISTILL_MODES)} or null")
        _check(isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0,
               f"qat.distill.weight={self.weight!r} must be a finite number >= 0")
        _check(self.blocks is None or (isinstance(self.blocks, list) and all(isinstance(b, str) for b in self.blocks)),
               "qat.distill.blocks must be a list of module names or null")
        _check(not self.label_free or self.mode is not None, "qat.distill.label_free needs qat.distill.mode set")
        _check(self.label_free_optimizer in ("sgd", "adamw"),
               f"qat.distill.label_free_optimizer '{self.label_free_optimizer}' unknown; use sgd or adamw")
        check_lr(self.label_free_lr, "qat.distill.label_free_lr")


@dataclass
class QATConfig:
    """Quantization-aware fine-tuning.

    Args:
        epochs (int): Defaults to 2.
        lr (float): peak learning rate (about 1% of the FP32 schedule's). Defaults to 1e-4.
        min_lr_ratio (float): cosine floor as a fraction of lr. Defaults to 0.01.
        optimizer (str): "sgd" or "adamw". Defaults to "sgd".
        momentum (float): Defaults to 0.9.
        weight_decay (float): Defaults to 5e-4.
        freeze_amax (bool): keep calibrated scales fixed. Defaults to True.
        freeze_bn (bool): keep BatchNorm running statistics fixed. Defaults to True.
        max_steps_per_epoch (int | None): cap steps per epoch. Defaults to None.
        grad_clip (float | None): Defaults to 10.0.
        device (str | None): Defaults to the model's device.
        distill (DistillConfig): distillation from the FP32 model. Defaults to off.
    """

    epochs: int = 2
    lr: float = 1e-4
    min_lr_ratio: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    freeze_amax: bool = True
    freeze_bn: bool = True
    max_steps_per_epoch: int | None = None
    grad_clip: float | None = 10.0
    device: str | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        if isinstance(self.distill, dict):
            self.distill = from_dict(DistillConfig, self.distill, "qat.distill")
        _check(self.epochs >= 1, f"qat.epochs={self.epochs} must be >= 1")
        check_lr(self.lr, "qat.lr")
        _check(0 <= self.min_lr_ratio <= 1, "qat.min_lr_ratio must be in [0, 1]")
        _check(self.optimizer in ("sgd", "adamw"), f"qat.optimizer '{self.optimizer}' unknown; use sgd or adamw")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
               f"qat.max_steps_per_epoch={self.max_steps_per_epoch} must be >= 1 or null (no cap)")
        _check(self.grad_clip is None or (self.grad_clip > 0 and math.isfinite(self.grad_clip)),
               f"qat.grad_clip={self.grad_clip} must be a positive number or null (no clipping)")
        check_device(self.device)


@dataclass
class ExportConfig:
    """ONNX export.

    Args:
        opset (int): ONNX opset, at least 13 (per-channel QuantizeLinear axis). Defaults to 17.
        dynamic_batch (bool): Defaults to True.
        imgsz (int): export input size. Defaults to 128.
    """

    opset: int = 17
    dynamic_batch: bool = True
    imgsz: int = 128

    def __post_init__(self):
        check_opset(self.opset)
        check_imgsz(self.imgsz, "export.imgsz")


@dataclass
class DataConfig:
    """Dataset. ``data`` is a YOLO data.yaml; ``generate`` creates the digits-det demo set there if missing;
    ``imgsz`` null takes the size the checkpoint records (its training size), else 128."""

    data: str = "datasets/digits-det/data.yaml"
    imgsz: int | None = None
    batch_size: int = 16
    calib_split: str = "calib"
    train_split: str = "train"
    val_split: str = "val"
    max_val_images: int | None = None
    max_train_images: int | None = None
    generate: bool = False
    workers: int = 0

    def __post_init__(self):
        if self.imgsz is not None:
            check_imgsz(self.imgsz, "data.imgsz")
        _check(self.batch_size >= 1, "data.batch_size must be >= 1")
        _check(self.workers >= 0, f"data.workers={self.workers} must be >= 0")
        for key in ("max_val_images", "max_train_images"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"data.{key}={value} must be >= 1 or null (all images)")


@dataclass
class ModelConfig:
    """Model: an FP32 checkpoint, the model's name (checked against the checkpoint's when it has one) and its family
    (None: recognised from the checkpoint)."""

    name: str | None = "yolo-n"
    checkpoint: str | None = None
    family: str | None = None


@dataclass
class RunConfig:
    """Pipeline run: output directory, methods to compare, threads, seed."""

    name: str = "demo"
    out_dir: str = "reports"
    calib_methods: list = field(default_factory=lambda: list(CALIB_METHODS))
    threads: int | None = None
    seed: int = 0
    sensitivity: bool = False

    def __post_init__(self):
        bad = [m for m in self.calib_methods if m not in CALIB_METHODS]
        _check(not bad, f"run.calib_methods has unknown method(s) {bad}; valid: {', '.join(CALIB_METHODS)}")
        _check(len(self.calib_methods) > 0, "run.calib_methods is empty; list at least one method")
        _check(self.threads is None or self.threads >= 1, f"run.threads={self.threads} must be >= 1 or null "
               "(torch's choice)")
        _check(self.seed >= 0, f"run.seed={self.seed} must be >= 0")


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("prune", "sparsity"):  # (off by default: left out, so runs without them keep their fingerprint)
            if d[key] == dataclasses.asdict(type(getattr(self, key))()):
                del d[key]
        return d


def _typed(value, annotation: str, key: str):
    """``value`` checked against a field annotation (``int``, ``float | None``, ``list``, ...). Numbers written as
    strings are read as numbers (PyYAML reads ``1e-4`` as a string); anything else of the wrong type is refused."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return None
    if "float" in kinds:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    if "int" in kinds:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "str" in kinds and isinstance(value, str):
        return value
    if ("list" in kinds or "tuple" in kinds) and isinstance(value, (list, tuple)):
        return value
    if not set(kinds) & {"int", "float", "bool", "str", "list", "tuple"}:
        return value  # a type this check does not know: the dataclass validates it
    wanted = " or ".join("null" if k == "None" else k for k in kinds)
    raise TrtQatError(f"config key '{key}' must be {wanted}, got {value!r}")


def from_dict(cls, values: dict | None, section: str | None = None):
    """Build dataclass ``cls`` from ``values``, refusing unknown keys (with the list of valid ones) and values of
    the wrong type."""
    if values is not None and not isinstance(values, dict):
        raise TrtQatError(f"config section '{section or 'top'}' must be a mapping of keys, not {values!r}")
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{section}." if section else ""
    for key in values:
        if key not in names:
            raise TrtQatError(f"unknown config key '{where}{key}'; valid keys: {', '.join(names)}")
    kwargs = {}
    for key, value in values.items():
        f = names[key]
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            value = from_dict(type(f.default_factory()), value, key)
        else:
            value = _typed(value, f.type, f"{where}{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TrtQatError(f"bad config section '{section or 'top'}': {exc}") from None


def load_pipeline_config(path, overrides: dict | None = None) -> PipelineConfig:
    """Load a YAML pipeline config (one section per stage)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TrtQatError(f"config file '{path}' does not exist; pass --config configs/demo.yaml or a file of yours")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TrtQatError(f"config file '{path}' is not valid UTF-8 YAML ({exc.__class__.__name__}); "
                          "fix its syntax") from None
    if not isinstance(raw, dict):
        raise TrtQatError(f"config file '{path}' must be a mapping of sections (model, data, quant, ...)")
    for dotted, value in (overrides or {}).items():
        sec, _, key = dotted.partition(".")
        if raw.get(sec) is None:
            raw[sec] = {}
        if not isinstance(raw[sec], dict):
            raise TrtQatError(f"config section '{sec}' must be a mapping of keys, not {raw[sec]!r}")
        raw[sec][key] = value
    return from_dict(PipelineConfig, raw)
