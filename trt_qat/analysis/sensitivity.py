"""Per-layer quantization sensitivity, and an automatic skip list for the QAT stage.

Two views are offered, over the layers of :func:`trt_qat.analysis.toggle.list_layers`:

* **leave-one-out** (``yolov7_qat``'s view): every layer quantized except one. ``delta = score - quantized``:
  how much the metric recovers when that layer stays in float (positive = the layer hurts).
* **only-one** (pytorch-quantization's example): only one layer quantized. ``delta = fp32 - score``: how much
  that layer alone costs.

Layers are put in float with :mod:`trt_qat.analysis.toggle` (no quantizer's state is touched). Metrics are
``metric_fn(model) -> float`` (higher is better), e.g. from :mod:`trt_qat.analysis.metrics`; tables and charts of
the results are in :mod:`trt_qat.analysis.format`.
"""
from __future__ import annotations

import contextlib
import re

from torch import nn

from trt_qat.analysis.forward_cache import ForwardCache
from trt_qat.analysis.toggle import (
    layers_in_float,
    list_layers,
    make_float_permanent,
    resolve_layers,
    set_layers_float,
)
from trt_qat.errors import LOG, TrtQatError

__all__ = ["MODES", "baseline_scores", "layer_sensitivity", "skip_patterns", "auto_skip"]

MODES = ("leave-one-out", "only-one")


def baseline_scores(model: nn.Module, metric_fn) -> dict:
    """``{"quantized": score with every layer quantized, "fp32": score with every layer in float}``."""
    quantized = float(metric_fn(model))
    with layers_in_float(model):
        fp32 = float(metric_fn(model))
    return {"quantized": quantized, "fp32": fp32}


def layer_sensitivity(model: nn.Module, metric_fn, mode: str = "leave-one-out", layers=None, progress: bool = True,
                      baseline: dict | None = None, cache_mb: float = 1024.0) -> list:
    """Measure each quantized layer's impact on ``metric_fn``.

    Args:
        model (nn.Module): a calibrated quantized model (every enabled quantizer has an amax). Left as it was.
        metric_fn (Callable[[nn.Module], float]): higher is better, e.g. :func:`trt_qat.analysis.metrics.map_metric`
            or :func:`trt_qat.analysis.metrics.sqnr_metric`.
        mode (str): "leave-one-out" (all layers quantized but one; ``delta = score - quantized score``),
            "only-one" (only one layer quantized; ``delta = fp32 score - score``) or "both". Defaults to
            "leave-one-out".
        layers (Iterable[str] | None): evaluate only these layers (names from
            :func:`trt_qat.analysis.toggle.list_layers`). Defaults to all.
        progress (bool): show a tqdm bar. Defaults to True.
        baseline (dict | None): ``{"quantized", "fp32"}`` scores from :func:`baseline_scores`, to avoid recomputing
            them. Defaults to None (computed here).
        cache_mb (float): memory for reusing the outputs of sub-modules upstream of the layer under test (their
            inputs and state are unchanged, so their outputs are too); 0 turns it off. The metric must run the same
            inputs in the same order each time (both built-in metrics do). Defaults to 1024.

    Returns:
        list[dict]: ``layer``, ``mode``, ``score``, ``delta`` (positive = quantizing the layer hurts) and
        ``baseline`` (the score delta is measured against), most sensitive first; with "both", the leave-one-out
        list then the only-one list.
    """
    from tqdm import tqdm

    from trt_qat.quant.instrument import check_amax

    if mode == "both":
        base = baseline or baseline_scores(model, metric_fn)
        return [r for m in MODES for r in layer_sensitivity(model, metric_fn, m, layers, progress, base, cache_mb)]
    if mode not in MODES:
        raise TrtQatError(f"unknown sensitivity mode '{mode}'; choose one of {', '.join(MODES)} or both")
    check_amax(model, "sensitivity analysis")
    table = resolve_layers(model, layers)
    if not table:
        raise TrtQatError("the model has no quantized layers; quantize and calibrate it first (trt_qat.quantize, "
                          "trt_qat.calibrate)")
    everything = list_layers(model)
    key = "quantized" if mode == "leave-one-out" else "fp32"
    reference_float = None if mode == "leave-one-out" else everything
    results = []
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(ForwardCache(model, cache_mb)) if cache_mb and cache_mb > 0 else None
        if cache is not None or baseline is None or key not in baseline:
            # the reference run (it also records the cache)
            if cache is not None:
                cache.start(recording=True)
            with layers_in_float(model, reference_float or []):
                score = float(metric_fn(model))
            baseline = {**(baseline or {}), key: baseline[key] if baseline and key in baseline else score}
        ref = baseline[key]
        for name in tqdm(table, desc=f"sensitivity {mode}", disable=not progress, leave=False, dynamic_ncols=True):
            floated = [name] if mode == "leave-one-out" else [n for n in everything if n != name]
            if cache is not None:
                cache.start(changed=[name])
            with layers_in_float(model, floated):
                score = float(metric_fn(model))
            delta = score - ref if mode == "leave-one-out" else ref - score
            results.append({"layer": name, "mode": mode, "score": score, "delta": delta, "baseline": ref})
        if cache is not None:
            LOG.debug("sensitivity %s: forward cache reused %d of %d module calls (%.0f MB)", mode, cache.hits,
                      cache.calls, cache.used / 2**20)
    results.sort(key=lambda r: -r["delta"])   # stable: ties keep module order
    return results


def skip_patterns(names) -> list:
    """Exact-match regexes (``^name$``, dots escaped) for ``QuantConfig.skip``."""
    return [f"^{re.escape(n)}$" for n in names]


def _ranked_names(ranking) -> list:
    names = []
    for r in ranking:
        name = r["layer"] if isinstance(r, dict) else str(r)
        if name not in names:
            names.append(name)
    return names


def auto_skip(model: nn.Module, metric_fn, fp32_score: float, target: float, ranking, restore: bool = False,
              progress: bool = True) -> list:
    """Greedily leave the most sensitive layers in float until ``fp32_score - score <= target``.

    Layers are added in ``ranking`` order, one at a time, re-measuring the metric after each.

    Args:
        model (nn.Module): a calibrated quantized model.
        metric_fn (Callable[[nn.Module], float]): higher is better.
        fp32_score (float): the metric of the float model (see :func:`baseline_scores`).
        target (float): the allowed gap to ``fp32_score``, in the metric's units (mAP 0..1, or dB).
        ranking (list[dict] | list[str]): :func:`layer_sensitivity` results (or layer names), most sensitive first.
        restore (bool): put the model back as it was. Defaults to False: the skipped layers stay in float (each
            gets a disabled copy of its quantizers; quantizers shared with other layers stay enabled there).
        progress (bool): log each step. Defaults to True.

    Returns:
        list[str]: skip patterns (``^name$``) for ``QuantConfig.skip``; empty when the target is met already.
        ``auto_skip.last`` (a dict) holds the final score and the per-step scores.
    """
    if target < 0:
        raise TrtQatError(f"auto-skip target {target} must be >= 0 (the allowed gap to the FP32 metric)")
    order = _ranked_names(ranking)
    resolve_layers(model, order)
    chosen, steps = [], []
    score = float(metric_fn(model))
    steps.append({"skipped": 0, "score": score})
    restores = []
    try:
        for name in order:
            if fp32_score - score <= target:
                break
            restores.append(set_layers_float(model, [name]))
            chosen.append(name)
            score = float(metric_fn(model))
            steps.append({"skipped": len(chosen), "layer": name, "score": score})
            if progress:
                LOG.info("auto-skip: %s in float -> %.5g (gap %.5g, target %.5g)", name, score, fp32_score - score,
                         target)
    finally:
        for r in reversed(restores):
            r()
    reached = fp32_score - score <= target
    if not reached:
        LOG.warning("auto-skip: the gap is still %.5g > %.5g with all %d ranked layers in float", fp32_score - score,
                    target, len(chosen))
    if chosen and not restore:
        make_float_permanent(model, chosen)
    auto_skip.last = {"score": score, "reached": reached, "steps": steps, "layers": chosen}
    return skip_patterns(chosen)


auto_skip.last = {}
