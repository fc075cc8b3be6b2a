"""Quantization-aware fine-tuning.

Scales stay frozen by default (amax are buffers set by calibration), the learning rate is small and decays on a
cosine, BatchNorm statistics are frozen, and a checkpoint is written atomically after every epoch: ``last.pt``
always, ``best.pt`` when ``eval_fn`` reports a better score. A run started again with the same
``checkpoint_dir`` resumes from ``last.pt``. The loop itself is :func:`trt_qat.train.loop.fit`, the same one FP32
training runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trt_qat.calibration.calibrate import set_weight_amax
from trt_qat.config import QATConfig
from trt_qat.quant.checkpoint import save_quantized
from trt_qat.quant.instrument import check_amax
from trt_qat.train.loop import FreezeBatchNorm, build_optimizer, fit, warmup_cosine

__all__ = ["finetune", "RefreshWeightAmax"]


def finetune(model: nn.Module, data, loss_fn, epochs: int | None = None, lr: float | None = None,
             config: QATConfig | None = None, eval_fn=None, checkpoint_dir=None, resume: bool = True,
             progress: bool = True, higher_is_better: bool = True, is_main_process: bool | None = None,
             fingerprint: str | None = None, teacher=None, extra_hooks=()) -> dict:
    """Fine-tune a calibrated model with fake quantization.

    The loop is :func:`trt_qat.train.loop.fit`: under torchrun (see :func:`trt_qat.dist.init_distributed`) the model
    is wrapped in ``DistributedDataParallel`` (gradients averaged over ranks, so every rank keeps the same weights),
    ``data.sampler.set_epoch(epoch)`` is called when the sampler has it (a ``DistributedSampler``), ``eval_fn`` runs on
    rank 0 and its score is broadcast, and only rank 0 writes checkpoints.

    Args:
        model (nn.Module): quantized and calibrated (every enabled quantizer has an amax).
        data (Iterable): training batches; re-iterated every epoch (a DataLoader).
        loss_fn (Callable): ``loss_fn(model, batch) -> scalar loss``.
        epochs (int): overrides ``config.epochs``.
        lr (float): overrides ``config.lr``.
        config (QATConfig): Defaults to ``QATConfig()``.
        eval_fn (Callable): ``eval_fn(model) -> float`` score; the best epoch's weights are kept and restored.
        checkpoint_dir (str): where ``last.pt``/``best.pt`` go. Defaults to no checkpoints.
        resume (bool): continue from ``checkpoint_dir/last.pt`` when present. Defaults to True.
        fingerprint (str): identifies the run (config, starting weights); a ``last.pt`` written under another
            fingerprint is not resumed from (QAT starts afresh, with a warning). Defaults to None.
        is_main_process (bool | None): whether this process writes checkpoints and runs ``eval_fn``. Defaults to
            rank 0 under torch.distributed, True otherwise.
        teacher (Teacher | None): a frozen teacher; ``loss_fn`` is then called as ``loss_fn(net, batch, teacher)``.
            Defaults to None.
        extra_hooks (Sequence): more loop hooks (:mod:`trt_qat.train.loop`), e.g. re-applying sparsity masks after
            every step. Defaults to none.

    Returns:
        dict: ``{"history": [...], "best_score": float | None, "best_epoch": int | None}``.
    """
    cfg = config or QATConfig()
    overrides = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    if overrides:
        cfg = QATConfig(**{**cfg.__dict__, **overrides})
    check_amax(model, stage="QAT")
    device = torch.device(cfg.device) if cfg.device else next(model.parameters()).device
    model.to(device)  # before the optimizer is built over its parameters
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    hooks = [FreezeBatchNorm()] if cfg.freeze_bn else []
    if not cfg.freeze_amax:
        hooks.append(RefreshWeightAmax())
    ckdir = Path(checkpoint_dir) if checkpoint_dir else None
    return fit(model, data, loss_fn, optimizer, epochs=cfg.epochs,
               lr_at=lambda step, total, _group: warmup_cosine(step, total, cfg.lr, cfg.min_lr_ratio),
               steps_per_epoch=cfg.max_steps_per_epoch, grad_clip=cfg.grad_clip, teacher=teacher,
               hooks=[*hooks, *extra_hooks], eval_fn=eval_fn, higher_is_better=higher_is_better,
               save_fn=lambda m, path, extra: save_quantized(m, path, extra=extra),
               last_path=ckdir / "last.pt" if ckdir else None, best_path=ckdir / "best.pt" if ckdir else None,
               resume=resume, fingerprint=fingerprint, device=device, progress=progress, desc="qat", what="QAT",
               is_main_process=is_main_process)


class RefreshWeightAmax:
    """Hook: with unfrozen scales, set every weight quantizer's amax from its weights after each epoch."""

    def on_epoch_end(self, loop):
        set_weight_amax(loop.model)
