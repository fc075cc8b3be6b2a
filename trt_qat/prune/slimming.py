"""Network slimming's sparsity-regularised training: L1 on BatchNorm scales (gammas), so that BN-scale importance
(``prune(..., importance="bn_scale")``) finds channels that carry nothing.

The L1 term is applied as a proximal step after every optimizer step (:class:`BNL1`, a training-loop
``after_step`` hook): ``gamma <- sign(gamma) * max(|gamma| - lr * strength, 0)``, the exact update of
``loss + strength * sum |gamma|`` for the part the loss does not see, which drives unimportant gammas to exactly
zero instead of oscillating around it as a subgradient would.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from trt_qat.errors import LOG, TrtQatError

__all__ = ["BNL1", "bn_sparsity_train", "bn_gamma_stats"]


class BNL1:
    """Training-loop hook: soft-threshold every BatchNorm gamma after each step (see the module docstring).

    Args:
        strength (float): the L1 weight ``s`` (network slimming uses about 1e-4 to 1e-3 at SGD learning rates).
        skip (Sequence[str]): regexes of BatchNorm names left alone.
    """

    def __init__(self, strength: float = 1e-3, skip=()):
        if not strength > 0:
            raise TrtQatError(f"BN sparsity strength {strength!r} must be > 0 (e.g. 1e-3)")
        self.strength = float(strength)
        self.skip = [re.compile(p) for p in skip]

    def _bns(self, model):
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                if not any(rx.search(name) for rx in self.skip):
                    yield m

    @torch.no_grad()
    def after_step(self, loop):
        # the BatchNorm param group of build_optimizer (decay, bn, bias); its learning rate scales the step
        groups = loop.optimizer.param_groups
        lr = groups[1]["lr"] if len(groups) > 1 else groups[0]["lr"]
        t = lr * self.strength
        for m in self._bns(loop.model):
            g = m.weight
            g.copy_(g.sign() * (g.abs() - t).clamp_min(0.0))


def bn_gamma_stats(model: nn.Module, threshold: float = 1e-2) -> dict:
    """``{"count", "below", "fraction_below"}``: BatchNorm gammas with ``|gamma| < threshold``."""
    gammas = [m.weight.detach().abs().flatten() for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not gammas:
        return {"count": 0, "below": 0, "fraction_below": 0.0}
    g = torch.cat(gammas)
    below = int((g < threshold).sum())
    return {"count": int(g.numel()), "below": below, "fraction_below": below / g.numel()}


def bn_sparsity_train(model: nn.Module, adapter, data, epochs: int = 1, lr: float = 0.01, strength: float = 1e-3,
                      optimizer: str = "sgd", max_steps: int | None = None, skip=(), progress: bool = True) -> dict:
    """Train ``model`` (FP32, in place) with its family's detection loss plus L1 on BatchNorm gammas.

    Args:
        model (nn.Module): the FP32 model.
        adapter (ModelAdapter): its family (the loss).
        data (Iterable): training batches (a DataLoader).
        epochs (int): Defaults to 1.
        lr (float): peak learning rate (cosine decay). Defaults to 0.01.
        strength (float): the L1 weight. Defaults to 1e-3.
        optimizer (str): "sgd" or "adamw". Defaults to "sgd".
        max_steps (int | None): cap on steps per epoch. Defaults to the whole loader.
        skip (Sequence[str]): regexes of BatchNorms left unregularised (the kept layers'). Defaults to none.

    Returns:
        dict: the loop's result plus ``gammas`` (:func:`bn_gamma_stats` after training).
    """
    from trt_qat.train.loop import build_optimizer, fit, warmup_cosine

    opt = build_optimizer(model, optimizer, lr)
    peak = opt.param_groups[0]["initial_lr"]
    result = fit(model, data, adapter.loss_fn(model), opt, epochs=int(epochs), steps_per_epoch=max_steps,
                 lr_at=lambda step, total, _g: warmup_cosine(step, total, peak, 0.1), hooks=[BNL1(strength, skip)],
                 restore_best=False, progress=progress, desc="bn-sparsity", what="BN-sparsity training")
    result["gammas"] = bn_gamma_stats(model)
    LOG.info("BN-sparsity training: %d of %d gammas below 0.01", result["gammas"]["below"], result["gammas"]["count"])
    return result
