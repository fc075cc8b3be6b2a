"""Quantized checkpoints: save a quantized model (weights, amax, quant config, architecture) and rebuild it."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from trt_qat.config import QuantConfig, from_dict
from trt_qat.errors import TrtQatError
from trt_qat.fileio import atomic_torch_save, read_checkpoint
from trt_qat.models.adapter import (
    adapter_for_checkpoint,
    adapter_for_model,
    family_of_pickle,
    get_adapter,
    read_checkpoint_or_name_family,
)
from trt_qat.quant.instrument import quantize
from trt_qat.quant.quantizer import iter_quantizers

__all__ = ["QUANT_FORMAT", "save_quantized", "load_quantized", "load_model"]


QUANT_FORMAT = "trt_qat.quantized/1"


def save_quantized(model: nn.Module, path, extra: dict | None = None):
    """Save a quantized model (weights, amax, quant config, and the architecture when its model family can describe
    it) atomically to ``path``."""
    adapter = adapter_for_model(model)
    arch = adapter.architecture(model)
    ckpt = {
        "format": QUANT_FORMAT,
        "quant_config": getattr(model, "trt_qat_quant_config", dataclasses.asdict(QuantConfig())),
        "rules_input_shape": getattr(model, "trt_qat_rules_input_shape", None),
        "imgsz": getattr(model, "trt_qat_imgsz", None),  # the size it was calibrated at: the later stages' default
        "model_family": adapter.family if arch is not None else None,
        "model_cfg": arch,
        "state_dict": model.state_dict(),
        "disabled_quantizers": [name for name, q in iter_quantizers(model) if q._disabled],
    }
    ckpt.update(extra or {})
    atomic_torch_save(ckpt, path)
    return path


def load_quantized(path, model: nn.Module | None = None):
    """Rebuild a quantized model saved by :func:`save_quantized`.

    Args:
        path (str): checkpoint path.
        model (nn.Module): the FP32 architecture to instrument. Defaults to rebuilding it, through its family's
            adapter, from the checkpoint's ``model_cfg``.
    """
    return _quantized_from_checkpoint(read_checkpoint(path), path, model)


def _quantized_from_checkpoint(ckpt: dict, path, model: nn.Module | None = None):
    if ckpt.get("format") != QUANT_FORMAT:
        raise TrtQatError(f"'{path}' is not a trt_qat quantized checkpoint; produce one with `trt-qat calibrate`")
    if model is None:
        if not ckpt.get("model_cfg"):
            raise TrtQatError(f"'{path}' has no model_cfg; pass the FP32 model to load_quantized(path, model)")
        adapter = adapter_for_checkpoint(ckpt)
        model = adapter.tag(adapter.from_architecture(ckpt["model_cfg"]))
    if not isinstance(ckpt.get("quant_config"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise TrtQatError(f"checkpoint '{path}' lacks its quant_config or state_dict; re-run `trt-qat calibrate`")
    qcfg = from_dict(QuantConfig, ckpt["quant_config"], "quant_config")
    sample = None
    if qcfg.rules and ckpt.get("rules_input_shape"):
        sample = torch.zeros(ckpt["rules_input_shape"])
    quantize(model, qcfg, sample_input=sample)
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        detail = str(exc).strip().splitlines()[-1].strip()
        raise TrtQatError(f"checkpoint '{path}' does not match the model ({detail}); load it with the same "
                          "architecture it was saved from") from None
    if ckpt.get("imgsz"):
        model.trt_qat_imgsz = int(ckpt["imgsz"])
    quantizers = dict(iter_quantizers(model))
    for name in ckpt.get("disabled_quantizers", []):
        if name in quantizers:
            quantizers[name].disable()
    if missing or unexpected:
        raise TrtQatError(f"checkpoint '{path}' does not match the model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); load it with the same architecture it was saved from")
    return model, ckpt


def load_model(path, family: str | None = None):
    """Load a quantized (``calibrate``/``qat``) or FP32 checkpoint of any registered model family, reading the file
    once.

    Args:
        path (str | Path): the checkpoint.
        family (str | None): the model family, for an FP32 checkpoint in a family's own pickled format (an
            Ultralytics ``.pt``), which only its adapter reads. Defaults to recognising trt_qat's own files.

    Returns:
        tuple[nn.Module, dict, bool]: the model, the checkpoint dict, and whether the model is quantized.
    """
    if family and family_of_pickle(path) == family:  # (a foreign pickle: see load_fp32)
        adapter = get_adapter(family)
        model, ckpt = adapter.load(path)
        return adapter.tag(model, ckpt), ckpt, False
    ckpt = read_checkpoint_or_name_family(path)
    if ckpt.get("format") == QUANT_FORMAT:
        model, _ = _quantized_from_checkpoint(ckpt, path)
        return model, ckpt, True
    adapter = adapter_for_checkpoint(ckpt)
    return adapter.tag(adapter.from_checkpoint(ckpt, path), ckpt), ckpt, False
