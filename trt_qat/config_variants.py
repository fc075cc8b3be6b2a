"""The pipeline's optional model variants, ``prune:`` and ``sparsity:`` sections of a run config (re-exported by
:mod:`trt_qat.config`), dataclasses validated on creation. Both are off by default, so a config without them runs
exactly as before."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from trt_qat.errors import TrtQatError

__all__ = ["PruneConfig", "SparsityConfig"]


def _check(cond: bool, msg: str):
    if not cond:
        raise TrtQatError(msg)


def _check_lr(value, key: str):
    _check(isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1,
           f"{key}={value!r} must be a number in (0, 1]")


@dataclass
class PruneConfig:
    """Pipeline variant "pruned" (:mod:`trt_qat.prune`), off while both targets are null: prune the FP32 model,
    fine-tune it (distilled from the unpruned one), then calibrate and QAT it like the unpruned one."""

    target_macs: float | None = None
    target_params: float | None = None
    importance: str = "magnitude"
    keep: list = field(default_factory=list)
    round_to: int = 8
    finetune_epochs: int = 5
    finetune_lr: float = 0.005
    distill: bool = True

    def __post_init__(self):
        for key in ("target_macs", "target_params"):
            v = getattr(self, key)
            _check(v is None or 0 < v <= 1, f"prune.{key}={v!r} must be in (0, 1] (the fraction kept) or null")
        _check(self.importance in ("magnitude", "bn_scale"), f"prune.importance '{self.importance}' unknown; use "
               "magnitude or bn_scale")
        _check(self.round_to >= 1 and self.finetune_epochs >= 0, "prune.round_to must be >= 1, finetune_epochs >= 0")
        _check_lr(self.finetune_lr, "prune.finetune_lr")
        for pattern in self.keep:
            _check(isinstance(pattern, str) and _regex_ok(pattern), f"prune.keep {pattern!r} is not a valid regex")


@dataclass
class SparsityConfig:
    """Pipeline variant "2:4" (:mod:`trt_qat.prune.sparsity`), off unless ``enabled``: magnitude 2:4 on the convs
    with at least ``min_channels`` input and output channels, fine-tuned with the masks, then calibrated and QAT."""

    enabled: bool = False
    min_channels: int = 256
    finetune_epochs: int = 2
    finetune_lr: float = 0.002

    def __post_init__(self):
        _check(self.min_channels >= 4 and self.finetune_epochs >= 0, "sparsity.min_channels must be >= 4 and "
               "sparsity.finetune_epochs >= 0")
        _check_lr(self.finetune_lr, "sparsity.finetune_lr")


def _regex_ok(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True
