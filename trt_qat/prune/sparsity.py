"""2:4 structured sparsity of conv weights, the pattern TensorRT's sparse tensor cores run.

For every output channel and every kernel position, each group of 4 consecutive input channels keeps its 2 largest
weights (by magnitude) and zeroes the other 2. TensorRT picks sparse kernels only for large layers (about 256
channels or more, NVIDIA/TensorRT #4065), so smaller convs are skipped by a rule (:func:`sparsity_rule`), printed
where it is applied.

* :func:`sparsify` zeroes the weights of every eligible conv and returns the masks;
* :class:`SparsityMasks` is a training-loop hook (``after_step``) that re-applies them after every optimizer step,
  for FP32 fine-tuning and QAT alike (a quantized conv keeps its name and its ``weight``);
* QAT keeps the pattern by construction: per-channel symmetric INT8 (zero-point 0) maps 0 to 0.
"""
from __future__ import annotations

import torch
from torch import nn

from trt_qat.errors import TrtQatError

__all__ = ["DEFAULT_MIN_CHANNELS", "sparsity_rule", "eligible_convs", "mask_2_4", "holds_2_4", "sparsify",
           "SparsityMasks", "sparsity_hook", "sparsity_stats", "conv_macs"]

DEFAULT_MIN_CHANNELS = 256


def sparsity_rule(min_channels: int = DEFAULT_MIN_CHANNELS) -> str:
    """The eligibility rule, as printed."""
    return (f"2:4 sparsity rule: a Conv2d with groups=1, input channels a multiple of 4, and at least {min_channels} "
            f"input and {min_channels} output channels (TensorRT runs smaller convs densely)")


def _reason(m: nn.Module, min_channels: int) -> str | None:
    """Why conv ``m`` is not eligible, or None when it is."""
    if not isinstance(m, nn.modules.conv._ConvNd) or m.transposed or m.weight.dim() != 4:
        return "not a Conv2d"  # (a quantized QuantConv2d is a _ConvNd, not an nn.Conv2d)
    if m.groups != 1:
        return f"grouped (groups={m.groups})"
    if m.in_channels % 4:
        return f"{m.in_channels} input channels, not a multiple of 4"
    if m.in_channels < min_channels or m.out_channels < min_channels:
        return f"{m.in_channels} in / {m.out_channels} out channels, below {min_channels}"
    return None


def eligible_convs(model: nn.Module, min_channels: int = DEFAULT_MIN_CHANNELS) -> tuple:
    """``(eligible conv names, {skipped conv name: reason})`` under :func:`sparsity_rule`."""
    eligible, skipped = [], {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            why = _reason(m, int(min_channels))
            if why is None:
                eligible.append(name)
            else:
                skipped[name] = why
    return eligible, skipped


def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """The magnitude 2:4 mask (bool, same shape) of a conv weight ``[out, in, kh, kw]`` along input channels."""
    o, i = weight.shape[:2]
    if i % 4:
        raise TrtQatError(f"a conv weight with {i} input channels cannot hold 2:4 (needs a multiple of 4)")
    w = weight.detach().abs().movedim(1, -1)                       # [o, kh, kw, i]
    groups = w.reshape(*w.shape[:-1], i // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(w.shape).movedim(-1, 1).contiguous()


def holds_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive input channels of conv weight ``weight`` has at least 2 zeros."""
    if weight.dim() < 2 or weight.shape[1] % 4:
        return False
    w = weight.detach().movedim(1, -1)
    nonzero = (w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4) != 0).sum(-1)
    return bool((nonzero <= 2).all())


def conv_macs(model: nn.Module, example_input) -> dict:
    """``{conv name: MACs}`` of one forward on ``example_input`` (from each conv's output size)."""
    macs, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            def hook(mod, _inp, out, name=name):
                macs[name] = float(out[0].numel() * mod.weight[0].numel()) if out.dim() > 1 else 0.0
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


def sparsify(model: nn.Module, min_channels: int = DEFAULT_MIN_CHANNELS, verbose: bool = True) -> dict:
    """Zero ``model``'s eligible conv weights to the magnitude 2:4 pattern, in place.

    Returns:
        dict: ``masks`` ({conv name: bool mask}), ``skipped`` ({conv name: reason}), ``rule`` (text).

    Raises:
        TrtQatError: no conv is eligible.
    """
    if int(min_channels) < 4:
        raise TrtQatError(f"--min-channels {min_channels} must be >= 4 (one group of 4 input channels)")
    eligible, skipped = eligible_convs(model, min_channels)
    rule = sparsity_rule(int(min_channels))
    if not eligible:
        widest = max((min(m.in_channels, m.out_channels) for m in model.modules()
                      if isinstance(m, nn.modules.conv._ConvNd)), default=0)
        raise TrtQatError(f"no conv is eligible for 2:4 sparsity ({rule}; the widest conv has {widest}); lower "
                          "--min-channels or sparsify a wider model")
    modules = dict(model.named_modules())
    masks = {}
    with torch.no_grad():
        for name in eligible:
            w = modules[name].weight
            masks[name] = mask_2_4(w)
            w.mul_(masks[name].to(w.dtype))
    if verbose:
        print(f"{rule}: {len(eligible)} of {len(eligible) + len(skipped)} convs sparsified, {len(skipped)} skipped")
    return {"masks": masks, "skipped": skipped, "rule": rule}


class SparsityMasks:
    """Training-loop hook: re-apply 2:4 masks to the named convs' weights after every optimizer step (and at the
    start of every epoch), so fine-tuning and QAT keep the pattern."""

    def __init__(self, masks: dict):
        self.masks = masks

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name, mask in self.masks.items():
            w = modules[name].weight
            w.mul_(mask.to(device=w.device, dtype=w.dtype))

    def on_epoch_start(self, loop):
        self.apply(loop.model)

    def after_step(self, loop):
        self.apply(loop.model)


def sparsity_hook(model: nn.Module, min_channels: int = DEFAULT_MIN_CHANNELS) -> SparsityMasks | None:
    """A :class:`SparsityMasks` hook for the convs of ``model`` that already hold 2:4 (a sparsified checkpoint, or
    its quantized copy), or None when none does. The masks are the weights' own zero pattern."""
    modules = dict(model.named_modules())
    masks = {name: mask_2_4(modules[name].weight) for name in eligible_convs(model, min_channels)[0]
             if holds_2_4(modules[name].weight)}
    return SparsityMasks(masks) if masks else None


def sparsity_stats(model: nn.Module, example_input, min_channels: int = DEFAULT_MIN_CHANNELS) -> dict:
    """How much of ``model``'s conv work is 2:4-ready: ``eligible``/``sparse`` conv counts, ``macs_eligible``,
    ``macs_sparse`` (eligible and holding 2:4), ``macs_total``, and ``sparse_fraction_of_eligible``."""
    macs = conv_macs(model, example_input)
    modules = dict(model.named_modules())
    eligible = eligible_convs(model, min_channels)[0]
    sparse = [n for n in eligible if holds_2_4(modules[n].weight)]
    m_el, m_sp = sum(macs.get(n, 0.0) for n in eligible), sum(macs.get(n, 0.0) for n in sparse)
    return {"eligible": len(eligible), "sparse": len(sparse), "macs_eligible": m_el, "macs_sparse": m_sp,
            "macs_total": sum(macs.values()), "sparse_fraction_of_eligible": m_sp / m_el if m_el else 0.0}
