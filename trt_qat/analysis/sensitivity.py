"""Per-layer quantization sensitivity, and an automatic skip list for the QAT stage.

A *layer* is a module that owns quantizers directly (``_input_quantizer``, ``_weight_quantizer``, or the input
quantizers of a quantized elementwise module): a quantized Conv/ConvTranspose/Linear, a quantized pool, a
``QuantAdd``. Two views are offered:

* **leave-one-out** (``yolov7_qat``'s view): every layer quantized except one. ``delta = score - quantized``:
  how much the metric recovers when that layer stays in float (positive = the layer hurts).
* **only-one** (pytorch-quantization's example): only one layer quantized. ``delta = fp32 - score``: how much
  that layer alone costs.

A layer is put in float by swapping its quantizer attributes for ``nn.Identity`` *on that module only*, and
restored afterwards, so quantizers shared with other layers (scale-sharing rules) keep quantizing those layers
and no quantizer's state (enabled flag, amax, calibrator) is ever touched.

Metrics are ``metric_fn(model) -> float`` (higher is better): :func:`map_metric` (mAP50-95 through the same
evaluation as ``trt-qat eval``) or, without labels, :func:`sqnr_metric` (output SQNR in dB against FP32).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from trt_qat.errors import LOG, TrtQatError
from trt_qat.quant.quantizer import quantizer_enabled

__all__ = ["MODES", "list_layers", "layers_in_float", "set_layers_float", "baseline_scores", "layer_sensitivity",
           "sqnr", "sqnr_metric", "map_metric", "auto_skip", "skip_patterns", "format_table", "plot_sensitivity",
           "sensitivity_section"]

MODES = ("leave-one-out", "only-one")
#: SQNR reported when the output is bit-identical to the reference (keeps JSON finite)
SQNR_CAP_DB = 200.0


# ------------------------------------------------------------------------------------------------ layers
def _is_quantizer(module) -> bool:
    from pytorch_quantization.nn import TensorQuantizer

    return isinstance(module, TensorQuantizer)


def _owned_quantizers(module: nn.Module) -> dict:
    """``{attribute: quantizer}`` for the quantizers ``module`` holds directly."""
    return {k: m for k, m in module._modules.items() if m is not None and _is_quantizer(m)}


def _layer_table(model: nn.Module) -> dict:
    """``{name: module}`` of every layer with at least one enabled quantizer, in module order."""
    table = {}
    for name, module in model.named_modules():
        if _is_quantizer(module):
            continue
        owned = _owned_quantizers(module)
        if owned and any(quantizer_enabled(q) for q in owned.values()):
            table[name] = module
    return table


def list_layers(model: nn.Module) -> list:
    """Names of the quantized layers of ``model`` (modules owning an enabled quantizer), in module order."""
    return list(_layer_table(model))


def _resolve(model: nn.Module, names) -> dict:
    table = _layer_table(model)
    if names is None:
        return table
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise TrtQatError(f"{unknown[:3]} {'is' if len(unknown) == 1 else 'are'} not quantized layers of this model; "
                          f"choose among list_layers(model) (e.g. {list(table)[:3]})")
    return {n: table[n] for n in names}


def set_layers_float(model: nn.Module, names=None):
    """Put the named layers in float by swapping their quantizers for ``nn.Identity`` on those modules only.

    Args:
        model (nn.Module): a quantized model.
        names (Iterable[str] | None): layer names from :func:`list_layers`. Defaults to all layers.

    Returns:
        Callable[[], None]: a function that puts the original quantizer objects back.
    """
    saved = []
    for module in _resolve(model, names).values():
        for attr, q in _owned_quantizers(module).items():
            saved.append((module, attr, q))
            setattr(module, attr, nn.Identity())

    def restore():
        for module, attr, q in reversed(saved):
            setattr(module, attr, q)
        saved.clear()

    return restore


@contextlib.contextmanager
def layers_in_float(model: nn.Module, names=None):
    """Context manager: the named layers (default all) run in float inside the block, quantized again after it.

    Quantizers shared with layers outside ``names`` keep quantizing those layers; no quantizer is modified.
    """
    restore = set_layers_float(model, names)
    try:
        yield model
    finally:
        restore()


def _make_float_permanent(model: nn.Module, names) -> None:
    """Leave the named layers in float for good: each gets a *disabled copy* of its quantizers, so that the
    state-dict keys stay the same (save/load still match) and shared quantizers stay enabled for other layers."""
    for module in _resolve(model, names).values():
        for attr, q in _owned_quantizers(module).items():
            clone = copy.deepcopy(q)
            clone.disable()
            setattr(module, attr, clone)


# ------------------------------------------------------------------------------------------------ metrics
def sqnr(reference: torch.Tensor, output: torch.Tensor, dim: int | None = None) -> float:
    """Signal-to-quantization-noise ratio in dB, ``10 log10(sum ref^2 / sum (ref - out)^2)``.

    Args:
        reference (torch.Tensor): the FP32 output.
        output (torch.Tensor): the quantized output, same shape.
        dim (int | None): compute one SQNR per index along this dimension (e.g. ``-1`` for the fields of a
            decoded detector output: box, objectness, classes) and average them in dB, so that large-valued fields
            (pixel coordinates) do not hide the others. Defaults to None (one SQNR over the whole tensor).

    Returns:
        float: SQNR in dB, at most ``SQNR_CAP_DB`` (identical tensors).
    """
    ref = reference.detach().double()
    err = (ref - output.detach().double()).pow(2)
    ref = ref.pow(2)
    if dim is None:
        sig, noise = ref.sum().reshape(1), err.sum().reshape(1)
    else:
        d = dim % ref.dim()
        sig = ref.movedim(d, 0).reshape(ref.shape[d], -1).sum(1)
        noise = err.movedim(d, 0).reshape(ref.shape[d], -1).sum(1)
    tiny = torch.finfo(torch.float64).tiny
    db = 10.0 * torch.log10(sig.clamp_min(tiny) / noise.clamp_min(tiny))
    db = torch.where(noise == 0, torch.full_like(db, SQNR_CAP_DB), db.clamp(max=SQNR_CAP_DB))
    if not torch.isfinite(db).all():
        raise TrtQatError("the model produced NaN/inf outputs; check the checkpoint's amax values and the inputs")
    return float(db.mean())


def _outputs(model: nn.Module, batches) -> list:
    """Every output tensor of ``model`` on ``batches`` (eval mode, no grad), flattened in order."""
    from trt_qat.calibration.calibrate import batch_input

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(batch_input(batch).to(device))
                stack = [out]
                while stack:
                    item = stack.pop(0)
                    if isinstance(item, torch.Tensor):
                        outs.append(item.float().cpu())
                    elif isinstance(item, dict):
                        stack = list(item.values()) + stack
                    elif isinstance(item, (list, tuple)):
                        stack = list(item) + stack
    finally:
        model.train(was_training)
    if not outs:
        raise TrtQatError("the model returned no tensors on the SQNR batches; sqnr_metric needs tensor outputs")
    return outs


def sqnr_metric(reference_model: nn.Module, batches, dim: int | None = None):
    """A metric for data without labels: the mean output SQNR (dB) of a model against ``reference_model``.

    The reference outputs are computed once, now; so ``reference_model`` may be the quantized model itself inside
    ``layers_in_float(model)`` (all quantizers bypassed), which is what the CLI does.

    Args:
        reference_model (nn.Module): the FP32 reference.
        batches (Iterable): a few input batches (tensors, ``(tensor, ...)`` tuples or dicts with "images"); they are
            kept in memory. Two or three are enough to rank layers.
        dim (int | None): see :func:`sqnr`; ``-1`` suits decoded detector outputs. Defaults to None.

    Returns:
        Callable[[nn.Module], float]: ``metric_fn(model)``, higher is better.
    """
    from trt_qat.calibration.calibrate import batch_input

    batches = [batch_input(b) for b in batches]
    if not batches:
        raise TrtQatError("sqnr_metric needs at least one input batch; pass a few batches of images")
    reference = _outputs(reference_model, batches)

    def metric_fn(model: nn.Module) -> float:
        outs = _outputs(model, batches)
        if len(outs) != len(reference) or any(o.shape != r.shape for o, r in zip(outs, reference)):
            raise TrtQatError("the model's outputs differ in number or shape from the reference model's; compare "
                              "the same architecture")
        return sum(sqnr(r, o, dim) for r, o in zip(reference, outs)) / len(reference)

    metric_fn.name = "sqnr_db"
    metric_fn.unit = "dB"
    return metric_fn


class _MaterializedDetection(torch.utils.data.Dataset):
    """The first ``n`` letterboxed items of a detection dataset, decoded once and kept in memory."""

    def __init__(self, dataset, n: int):
        self.items = [dataset[i] for i in range(n)]
        self._gt = dataset.coco_ground_truth()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def coco_ground_truth(self):
        return self._gt


@contextlib.contextmanager
def _quiet_tqdm():
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def map_metric(dataset, batch_size: int = 16, max_images: int | None = None, key: str = "map50_95",
               device=None, cache_limit_mb: float = 1024.0):
    """A metric from labels: the detector's COCO mAP through :func:`trt_qat.evaluate.evaluate` and a TorchRunner.

    Args:
        dataset (DetectionDataset): e.g. ``YoloDataset(data_yaml, "val")``.
        batch_size (int): Defaults to 16.
        max_images (int | None): evaluate only the first N images. Defaults to all.
        key (str): "map50_95" or "map50". Defaults to "map50_95".
        device (str | None): Defaults to the model's device.
        cache_limit_mb (float): letterboxed images are decoded once and kept in memory when they fit in this many
            MB (every layer is evaluated on the same images). Defaults to 1024.

    Returns:
        Callable[[nn.Module], float]: ``metric_fn(model)`` in mAP units (0..1), higher is better.
    """
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.runners.torch_runner import TorchRunner

    if key not in ("map50_95", "map50"):
        raise TrtQatError(f"map_metric key '{key}' is unknown; use 'map50_95' or 'map50'")
    if len(dataset) == 0:
        raise TrtQatError("the evaluation dataset is empty; point it at a split with images")
    n = len(dataset) if max_images is None else min(len(dataset), max(int(max_images), 1))
    item_mb = dataset[0][0].numel() * 4 / 2**20
    data = _MaterializedDetection(dataset, n) if n * item_mb <= cache_limit_mb else dataset

    def metric_fn(model: nn.Module) -> float:
        with _quiet_tqdm():
            result = evaluate(TorchRunner(model, device=device), data, batch_size=batch_size, max_images=n)
        return float(result[key])

    metric_fn.name = key
    metric_fn.unit = "mAP"
    return metric_fn


# ------------------------------------------------------------------------------------------------ forward cache
def _leaves(obj, out: list) -> list:
    """Flatten nested tuples/lists/dicts into their leaves (dict keys kept as leaves for comparison)."""
    if isinstance(obj, (list, tuple)):
        out.append(type(obj))
        for x in obj:
            _leaves(x, out)
        out.append(len(obj))
    elif isinstance(obj, dict):
        out.append(dict)
        for k, v in obj.items():
            out.append(k)
            _leaves(v, out)
    else:
        out.append(obj)
    return out


def _same_leaf(recorded, version, current) -> bool:
    if isinstance(recorded, torch.Tensor):
        if not isinstance(current, torch.Tensor):
            return False
        if current is recorded:
            return current._version == version   # the same tensor: unchanged unless modified in place since
        if current.shape != recorded.shape or current.dtype != recorded.dtype or current.device != recorded.device:
            return False
        # downstream of a changed layer every value differs: a few elements settle most mismatches cheaply
        head = min(current.numel(), 64)
        return (torch.equal(current.reshape(-1)[:head], recorded.reshape(-1)[:head])
                and torch.equal(current, recorded))
    if isinstance(current, torch.Tensor):
        return False
    try:
        return bool(recorded is current or recorded == current)
    except Exception:  # noqa: BLE001 - an uncomparable argument means "not the same call"
        return False


class _ForwardCache:
    """Reuse sub-module outputs that a sensitivity run cannot have changed.

    One *recording* run of the metric stores each module call's inputs and output (in the reference state: all
    quantized for leave-one-out, all float for only-one). In later runs, a module whose subtree holds no changed
    layer and whose inputs equal the recorded ones (same tensor object and unmodified, else ``torch.equal``)
    returns the recorded output instead of computing it; so everything upstream of the layer under test is
    skipped. Outputs modified in place since they were recorded are never reused. Calls are keyed by
    (forward of the root module, module, call number), so several batches and repeated calls work.
    """

    def __init__(self, model: nn.Module, budget_mb: float):
        self.model = model
        self.budget = float(budget_mb) * 2**20
        self.used = 0.0
        self.records = {}
        self.recording = False
        self.changed = set()
        self.hits = self.calls = 0
        self._root_calls = -1
        self._counts = {}
        self._wrapped = []
        # module -> the layers in its subtree
        self._subtree = {m: {x for x in m.modules() if _owned_quantizers(x)} for m in model.modules()}
        self._stored = set()

    def __enter__(self):
        for module in self.model.modules():
            if "forward" in module.__dict__ or _is_quantizer(module):
                continue   # an instance-level forward is the user's: leave it; quantizers are cheap
            module.forward = self._make_forward(module, module.forward, module is self.model)
            self._wrapped.append(module)
        return self

    def __exit__(self, *exc):
        for module in self._wrapped:
            module.__dict__.pop("forward", None)
        self._wrapped.clear()
        self.records.clear()
        return False

    def start(self, recording: bool = False, changed=()):
        """Begin one metric run: ``recording`` for the reference run, else the layer names changed from it."""
        self.recording = recording
        table = _layer_table(self.model)
        objs = {table[n] for n in changed if n in table}
        self.changed = {m for m, layers in self._subtree.items() if layers & objs}
        self._root_calls = -1

    def _size(self, obj) -> float:
        total = 0.0
        for t in _leaves(obj, []):
            if isinstance(t, torch.Tensor) and id(t) not in self._stored:
                self._stored.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def _make_forward(self, module, original, is_root):
        def forward(*args, **kwargs):
            if is_root:
                self._root_calls += 1
                self._counts = {}
                return original(*args, **kwargs)
            k = self._counts.get(module, 0)
            self._counts[module] = k + 1
            key = (self._root_calls, module, k)
            if self.recording:
                out = original(*args, **kwargs)
                if self.used < self.budget:
                    inputs = _leaves((args, kwargs), [])
                    self.used += self._size(inputs) + self._size(out)
                    outs = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor)]
                    self.records[key] = (inputs, [t._version if isinstance(t, torch.Tensor) else None
                                                  for t in inputs], out, [t._version for t in outs])
                return out
            self.calls += 1
            rec = self.records.get(key)
            if rec is not None and module not in self.changed:
                inputs, in_versions, out, out_versions = rec
                current = _leaves((args, kwargs), [])
                outs = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor)]
                if (len(current) == len(inputs) and all(t._version == v for t, v in zip(outs, out_versions))
                        and all(_same_leaf(r, v, c) for r, v, c in zip(inputs, in_versions, current))):
                    self.hits += 1
                    return out
            return original(*args, **kwargs)

        return forward


# ------------------------------------------------------------------------------------------------ sensitivity
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
        metric_fn (Callable[[nn.Module], float]): higher is better, e.g. :func:`map_metric` or :func:`sqnr_metric`.
        mode (str): "leave-one-out" (all layers quantized but one; ``delta = score - quantized score``),
            "only-one" (only one layer quantized; ``delta = fp32 score - score``) or "both". Defaults to
            "leave-one-out".
        layers (Iterable[str] | None): evaluate only these layers (names from :func:`list_layers`). Defaults to all.
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
    table = _resolve(model, layers)
    if not table:
        raise TrtQatError("the model has no quantized layers; quantize and calibrate it first (trt_qat.quantize, "
                          "trt_qat.calibrate)")
    everything = list_layers(model)
    key = "quantized" if mode == "leave-one-out" else "fp32"
    reference_float = None if mode == "leave-one-out" else everything
    results = []
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(_ForwardCache(model, cache_mb)) if cache_mb and cache_mb > 0 else None
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
    _resolve(model, order)
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
        _make_float_permanent(model, chosen)
    auto_skip.last = {"score": score, "reached": reached, "steps": steps, "layers": chosen}
    return skip_patterns(chosen)


auto_skip.last = {}


# ------------------------------------------------------------------------------------------------ output
def _by_layer(results):
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    rows = {}
    for r in results:
        rows.setdefault(r["layer"], {})[r["mode"]] = r
    return modes, rows


def format_table(results, unit: str = "") -> str:
    """A Markdown table, one row per layer (ranked by the first mode's delta), score and delta per mode."""
    if not results:
        return "(no layers evaluated)"
    modes, rows = _by_layer(results)
    suffix = f" ({unit})" if unit else ""
    head = ["rank", "layer"] + [h for m in modes for h in (f"{m} score{suffix}", f"{m} Δ{suffix}")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    first = modes[0]
    order = sorted(rows, key=lambda n: -rows[n][first]["delta"] if first in rows[n] else math.inf)
    for rank, name in enumerate(order, 1):
        cells = [str(rank), f"`{name}`"]
        for m in modes:
            r = rows[name].get(m)
            cells += [f"{r['score']:.5g}", f"{r['delta']:+.4g}"] if r else ["n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sensitivity(results, path, unit: str = "", title: str = "Per-layer quantization sensitivity") -> Path:
    """Write a horizontal bar chart of each layer's delta (one panel per mode), PNG, atomically.

    Args:
        results (list[dict]): :func:`layer_sensitivity` results.
        path (str | Path): the PNG to write.
        unit (str): the metric's unit for the axis label. Defaults to "".
        title (str): Defaults to "Per-layer quantization sensitivity".

    Returns:
        Path: ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trt_qat.fileio import atomic_path

    if not results:
        raise TrtQatError("no sensitivity results to plot; run layer_sensitivity first")
    modes, rows = _by_layer(results)
    n = max(len([r for r in results if r["mode"] == m]) for m in modes)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), max(3.0, 0.22 * n + 1.2)), squeeze=False)
    for ax, m in zip(axes[0], modes):
        part = sorted((r for r in results if r["mode"] == m), key=lambda r: -r["delta"])
        ys = range(len(part))
        colors = ["#c0392b" if r["delta"] > 0 else "#7f8c8d" for r in part]
        ax.barh(list(ys), [r["delta"] for r in part], color=colors)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([r["layer"] for r in part], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.6)
        what = "score - all quantized" if m == "leave-one-out" else "FP32 - score"
        ax.set_xlabel(f"Δ = {what}" + (f" ({unit})" if unit else ""))
        ax.set_title(f"{m} (most sensitive on top)", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def sensitivity_section(results, top: int = 10, unit: str = "") -> tuple:
    """``(heading, text)`` for :func:`trt_qat.report.write_report`'s ``sections``: the top layers per mode."""
    lines = []
    for m in MODES:
        part = [r for r in results if r["mode"] == m][:top]
        if part:
            lines.append(f"{m}:")
            lines += [f"  {i:>2}. {r['layer']:<40} score {r['score']:.5g}  Δ {r['delta']:+.4g}{unit and ' ' + unit}"
                      for i, r in enumerate(part, 1)]
    return "Quantization sensitivity", "\n".join(lines) or "(no layers evaluated)"


def _markdown(summary: dict, results, unit: str) -> str:
    b = summary["baseline"]
    md = ["# Per-layer quantization sensitivity", "",
          f"- checkpoint: `{summary['checkpoint']}`",
          f"- metric: {summary['metric']} ({unit}) on {summary['images']} images of split `{summary['split']}`",
          f"- FP32 (all quantizers bypassed): {b['fp32']:.5g}; all quantized (PTQ): {b['quantized']:.5g}",
          f"- layers evaluated: {summary['layers']}, modes: {', '.join(summary['modes'])}, "
          f"{summary['seconds']:.1f} s", "",
          "leave-one-out: Δ = score with that layer in float - score with all layers quantized. "
          "only-one: Δ = FP32 score - score with only that layer quantized. Positive Δ: the layer hurts."
          + (f" The FP32 SQNR is the {SQNR_CAP_DB:g} dB cap (no noise), so only-one Δ ranks layers but its size "
             "is not a loss." if unit == "dB" else ""), "",
          format_table(results, unit), "", "![sensitivity](sensitivity.png)", ""]
    skip = summary.get("auto_skip")
    if skip:
        md += ["## Auto-skip", "",
               f"target: {skip['target']} {skip['target_unit']}; reached: {skip['reached']}; final score "
               f"{skip['score']:.5g}; {len(skip['skip'])} layers left in float (`skip.yaml`):", ""]
        md += [f"- `{p}`" for p in skip["skip"]] or ["- (none needed)"]
        md.append("")
    return "\n".join(md)
