"""Quantization-aware fine-tuning.

Scales stay frozen by default (amax are buffers set by calibration), the learning rate is small and decays on a
cosine, BatchNorm statistics are frozen, and a checkpoint is written atomically after every epoch: ``last.pt``
always, ``best.pt`` when ``eval_fn`` reports a better score. A run started again with the same
``checkpoint_dir`` resumes from ``last.pt``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from trt_qat.calibration.calibrate import set_weight_amax
from trt_qat.config import QATConfig
from trt_qat.errors import LOG, TrtQatError
from trt_qat.quant.checkpoint import save_quantized
from trt_qat.quant.instrument import check_amax

__all__ = ["finetune", "cosine_lr"]


def cosine_lr(step: int, total: int, lr: float, min_lr_ratio: float = 0.01) -> float:
    """Cosine decay from ``lr`` to ``lr * min_lr_ratio`` over ``total`` steps."""
    if total <= 1:
        return lr
    t = min(max(step, 0), total - 1) / (total - 1)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def _freeze_bn(model: nn.Module):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _make_optimizer(model, cfg: QATConfig):
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def finetune(model: nn.Module, data, loss_fn, epochs: int | None = None, lr: float | None = None,
             config: QATConfig | None = None, eval_fn=None, checkpoint_dir=None, resume: bool = True,
             progress: bool = True, higher_is_better: bool = True, is_main_process: bool | None = None,
             fingerprint: str | None = None) -> dict:
    """Fine-tune a calibrated model with fake quantization.

    Under torchrun (a torch.distributed group is up, see :func:`trt_qat.distributed.init_distributed`) the model is
    wrapped in ``DistributedDataParallel`` (gradients averaged over ranks, so every rank keeps the same weights),
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

    Returns:
        dict: ``{"history": [...], "best_score": float | None, "best_epoch": int | None}``.
    """
    cfg = config or QATConfig()
    overrides = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    if overrides:
        cfg = QATConfig(**{**cfg.__dict__, **overrides})
    check_amax(model, stage="QAT")
    from tqdm import tqdm

    from trt_qat import dist as dist_util

    main = dist_util.is_main_process() if is_main_process is None else bool(is_main_process)

    device = torch.device(cfg.device) if cfg.device else next(model.parameters()).device
    model.to(device)
    optimizer = _make_optimizer(model, cfg)
    steps_per_epoch = len(data) if hasattr(data, "__len__") else None
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch or cfg.max_steps_per_epoch, cfg.max_steps_per_epoch)
    if not steps_per_epoch:
        raise TrtQatError("the QAT training data is empty or has no length; pass a DataLoader with batches")
    total_steps = steps_per_epoch * cfg.epochs
    ckdir = Path(checkpoint_dir) if checkpoint_dir else None
    start_epoch, history, best_score, best_epoch, best_state = 0, [], None, None, None

    state = None
    if ckdir and resume and (ckdir / "last.pt").is_file():
        from trt_qat.fileio import read_checkpoint

        try:
            state = read_checkpoint(ckdir / "last.pt")
        except TrtQatError as exc:
            raise TrtQatError(f"{exc}; or to start QAT afresh, delete {ckdir / 'last.pt'} (--no-resume ignores "
                              "it)") from None
        if not {"state_dict", "optimizer", "epoch"} <= set(state):
            raise TrtQatError(f"{ckdir / 'last.pt'} is not a QAT checkpoint (no state_dict/optimizer/epoch); delete "
                              "it or choose another --out")
        if state.get("fingerprint") != fingerprint:
            LOG.warning("not resuming from %s: it was written by a different run (config or starting weights "
                        "changed); starting QAT afresh", ckdir / "last.pt")
            state = None
    if state is not None:
        try:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            detail = str(exc).strip().splitlines()[0][:160]
            raise TrtQatError(f"{ckdir / 'last.pt'} was written by a different QAT run and cannot be resumed "
                              f"({detail}); delete it, pass --no-resume, or choose another --out") from None
        start_epoch = state["epoch"] + 1
        history = state.get("history", [])
        best_score, best_epoch = state.get("best_score"), state.get("best_epoch")
        if (ckdir / "best.pt").is_file() and best_epoch is not None:
            best_state = read_checkpoint(ckdir / "best.pt")["state_dict"]
        LOG.info("resuming QAT from %s (epoch %d of %d)", ckdir / "last.pt", start_epoch + 1, cfg.epochs)

    net = model  # what the loss runs: the DDP wrapper under torch.distributed (it averages the gradients)
    if dist_util.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = getattr(data, "sampler", None)

    def better(score):
        if best_score is None:
            return True
        return score > best_score if higher_is_better else score < best_score

    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        if cfg.freeze_bn:
            _freeze_bn(model)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        t0, running, n = time.time(), 0.0, 0
        bar = tqdm(data, total=steps_per_epoch, desc=f"qat {epoch + 1}/{cfg.epochs}", disable=not (progress and main),
                   leave=False)
        for i, batch in enumerate(bar):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, cfg.lr, cfg.min_lr_ratio)
            loss = loss_fn(net, batch)
            if not torch.isfinite(loss):
                raise TrtQatError(f"QAT loss became {float(loss)} at epoch {epoch + 1} step {i}; lower --lr "
                                  f"(now {cfg.lr:g}) or check the calibration")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            running += float(loss.detach())
            n += 1
            bar.set_postfix(loss=f"{running / n:.4f}")
        if not cfg.freeze_amax:
            set_weight_amax(model)
        record = {"epoch": epoch + 1, "loss": dist_util.all_reduce_mean(running / max(n, 1)),
                  "seconds": time.time() - t0, "lr_end": optimizer.param_groups[0]["lr"]}
        if eval_fn is not None:
            model.eval()
            score = dist_util.broadcast_object(float(eval_fn(model)) if main else None)
            record["score"] = score
            if better(score):
                best_score, best_epoch = score, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if ckdir and main:
                    save_quantized(model, ckdir / "best.pt", extra={"epoch": epoch, "score": score})
        history.append(record)
        LOG.info("qat epoch %d/%d loss %.4f%s (%.0fs)", epoch + 1, cfg.epochs, record["loss"],
                 f" score {record['score']:.4f}" if "score" in record else "", record["seconds"])
        if ckdir and main:
            save_quantized(model, ckdir / "last.pt", extra={
                "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                "best_score": best_score, "best_epoch": best_epoch, "fingerprint": fingerprint})
    dist_util.barrier()  # rank 0's checkpoints are on disk before any rank goes on
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"history": history, "best_score": best_score, "best_epoch": best_epoch}
