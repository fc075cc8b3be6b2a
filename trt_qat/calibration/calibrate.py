"""Calibration (PTQ initialisation) in two named steps: :func:`collect_stats`, then :func:`compute_amax`.

One statistics pass records both the running max and a histogram for every activation quantizer, so
``max``, ``percentile``, ``mse`` and ``entropy`` can all be computed (and compared) without running the data
again. Weight quantizers take the per-channel absolute max of the weights directly. Everything runs on the
device the model is on, CPU included.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from torch import nn

from trt_qat.calibration.reduce import all_reduce_calibrators, sync_calibrators
from trt_qat.config import CALIB_METHODS, CalibConfig
from trt_qat.dist import all_reduce_mean, get_world_size, is_distributed
from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_torch_save, read_checkpoint
from trt_qat.quant.pending import apply_pending_rules, rules_status
from trt_qat.quant.quantizer import activation_quantizers, iter_quantizers

__all__ = ["batch_input", "collect_stats", "compute_amax", "calibrate", "save_amax", "load_amax"]

#: amax given to a quantizer that only ever saw zeros (a scale of 0 is invalid in ONNX and TensorRT)
MIN_AMAX = 1e-6


def batch_input(batch) -> torch.Tensor:
    """The input tensor of a batch: a tensor, the first item of a tuple/list, or a dict's "images"/"img"."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("images", "img", "input", "x"):
            if key in batch:
                return batch[key]
        raise TrtQatError(f"batch dict has keys {sorted(batch)}; put the input tensor under 'images' or 'img'")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TrtQatError(f"cannot find the input tensor in a batch of type {type(batch).__name__}; yield tensors, "
                      "(tensor, ...) tuples or dicts with an 'images' entry")


def _model_device(model: nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _weight_quantizers(model):
    """(quantizer, weight) pairs, found through the modules that own them."""
    out = []
    for _, module in model.named_modules():
        q = getattr(module, "_weight_quantizer", None)
        if q is not None and not q._disabled and getattr(module, "weight", None) is not None:
            out.append((q, module.weight))
    return out


@torch.no_grad()
def collect_stats(model: nn.Module, data, num_batches: int | None = None, device=None, histogram: bool = True,
                  progress: bool = True) -> int:
    """Run ``data`` through ``model`` with quantization off and statistics collection on.

    Args:
        model (nn.Module): a model instrumented by :func:`trt_qat.quantize`.
        data (Iterable): batches (tensor, tuple/list with the input first, or dict with "images").
        num_batches (int | None): stop after this many batches. Defaults to all.
        device (str | None): Defaults to the model's device.
        histogram (bool): also collect histograms (needed for percentile/mse/entropy). Defaults to True.
        progress (bool): show a tqdm bar. Defaults to True.

    A model quantized without a sample input gets its placement rules here, from the first batch, before any
    statistics are collected (so the quantizers they create calibrate like the others).

    Under torchrun (a torch.distributed group is up) every rank collects on its own shard and the statistics are
    then reduced across ranks (max for amax, sum for histograms; see :mod:`trt_qat.calibration.reduce`): every rank ends
    with the statistics of all the data.

    Returns:
        int: the number of batches seen (over all ranks).
    """
    from tqdm import tqdm

    if not activation_quantizers(model):
        raise TrtQatError("the model has no activation quantizers; call trt_qat.quantize(model) first")
    device = _model_device(model, device)
    batches = iter(data)
    first = next(batches, None)
    if first is not None:
        apply_pending_rules(model, batch_input(first).to(device))
        batches = itertools.chain([first], batches)
    quantizers = activation_quantizers(model)
    was_training = model.training
    model.eval()
    for _, q in quantizers:
        q._calibrator.reset()
        q._calibrator.collect_histogram = histogram
        q.disable_quant()
        q.enable_calib()
    # under torchrun each rank sees its own shard: agree on the bins now, sum the statistics at the end
    distributed = is_distributed()
    sync_calibrators(model, enable=distributed)
    seen = 0
    try:
        total = num_batches
        if total is None and hasattr(data, "__len__"):
            total = len(data)
        for batch in tqdm(batches, total=total, desc="calibrate", disable=not progress, leave=False):
            model(batch_input(batch).to(device, non_blocking=True))
            seen += 1
            if num_batches is not None and seen >= num_batches:
                break
    finally:
        for _, q in quantizers:
            q.disable_calib()
            q.enable_quant()
        model.train(was_training)
    if distributed:
        seen_all = round(all_reduce_mean(seen) * get_world_size())
        if seen_all:
            all_reduce_calibrators(model)
        sync_calibrators(model, enable=False)
        seen = seen_all
    if seen == 0:
        raise TrtQatError("the calibration set is empty; point --data/--calib-split at images (a few hundred is "
                          "typical)")
    return seen


@torch.no_grad()
def set_weight_amax(model: nn.Module) -> None:
    """Set every enabled weight quantizer's amax to the absolute max of its weights (per channel when it has an
    axis). Weights need no statistics pass; QAT with unfrozen scales calls this again after each epoch."""
    for q, weight in _weight_quantizers(model):
        w = weight.detach()
        if q.axis is None:
            amax = w.abs().max()
        else:
            axis = q.axis if isinstance(q.axis, int) else q.axis[0]
            dims = [d for d in range(w.dim()) if d != axis % w.dim()]
            amax = w.abs().amax(dim=dims, keepdim=True)
        q.set_amax(amax.clamp_min(MIN_AMAX))


@torch.no_grad()
def compute_amax(model: nn.Module, method: str = "percentile", percentile: float = 99.99) -> dict:
    """Set every quantizer's amax from the collected statistics; returns ``{name: amax}``.

    Args:
        model (nn.Module): after :func:`collect_stats`.
        method (str): max, percentile, mse or entropy. Defaults to "percentile".
        percentile (float): Defaults to 99.99.
    """
    if method not in CALIB_METHODS:
        raise TrtQatError(f"unknown calibration method '{method}'; choose one of {', '.join(CALIB_METHODS)}")
    result = {}
    set_weight_amax(model)
    for name, q in activation_quantizers(model):
        cal = q._calibrator
        if cal.empty:
            LOG.warning("quantizer '%s' saw no data during calibration (its layer never ran in forward); it is "
                        "disabled. Skip that layer with quant.skip to silence this.", name)
            q.disable()
            continue
        amax = cal.compute_amax(method, percentile=percentile)
        if not math.isfinite(float(amax)):
            raise TrtQatError(f"quantizer '{name}' got a non-finite amax from '{method}'; the model produced NaN/inf "
                              "on the calibration data: check the checkpoint and the inputs")
        if float(amax) <= 0:
            LOG.warning("quantizer '%s' only saw zeros; amax set to %g", name, MIN_AMAX)
            amax = torch.tensor(MIN_AMAX)
        q.set_amax(amax.to(_model_device(model)))
        result[name] = float(amax)
    return result


def calibrate(model: nn.Module, data, method: str = "percentile", percentile: float = 99.99,
              num_batches: int | None = None, device=None, progress: bool = True) -> nn.Module:
    """Collect statistics over ``data`` and set amax with ``method``; returns the model.

    Afterwards every enabled quantizer has a finite, positive amax.
    """
    cfg = CalibConfig(method=method, percentile=percentile, num_batches=num_batches, device=device)
    seen = collect_stats(model, data, cfg.num_batches, cfg.device, histogram=cfg.method != "max",
                         progress=progress)
    amax = compute_amax(model, cfg.method, cfg.percentile)
    LOG.info("calibrated %d activation quantizers on %d batches (%s); %s", len(amax), seen, cfg.method,
             rules_status(model))
    return model


def save_amax(model: nn.Module, path) -> Path:
    """Write ``{quantizer_name: amax}`` atomically (torch.save), e.g. ``calib/<run>/amax.pt``."""
    table = {name: q.amax.detach().cpu().clone() for name, q in iter_quantizers(model) if q.amax is not None}
    atomic_torch_save({"format": "trt_qat.amax/1", "amax": table,
                       "disabled": [name for name, q in iter_quantizers(model) if q._disabled]}, path)
    return Path(path)


def load_amax(model: nn.Module, path) -> int:
    """Load amax values written by :func:`save_amax`; returns how many quantizers were set."""
    data = read_checkpoint(path)
    if not isinstance(data, dict) or data.get("format") != "trt_qat.amax/1":
        raise TrtQatError(f"'{path}' is not a trt_qat amax file; write one with save_amax() or `trt-qat calibrate`")
    quantizers = dict(iter_quantizers(model))
    unknown = sorted(set(data["amax"]) - set(quantizers))
    if unknown:
        raise TrtQatError(f"amax file '{path}' names quantizers this model lacks ({unknown[:3]}); quantize the same "
                          "architecture with the same config first")
    for name, amax in data["amax"].items():
        quantizers[name].set_amax(amax)
    for name in data.get("disabled", []):
        if name in quantizers:
            quantizers[name].disable()
    return len(data["amax"])
