"""FP32 baseline training of the built-in detector (the starting point of PTQ and QAT).

SGD (Nesterov) or AdamW, linear warm-up then cosine decay, an exponential moving average (EMA) of the
weights, mAP on the validation split every few epochs (through :class:`~trt_qat.runners.torch_runner.TorchRunner`
and :func:`~trt_qat.evaluate.evaluate`, the same path every backend takes) and the best EMA checkpoint kept,
written atomically.

Run ``trt-qat train --data datasets/digits-det/data.yaml --epochs 30`` (or ``python -m trt_qat.train``).
"""
from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trt_qat.errors import LOG, TrtQatError

__all__ = ["train_fp32", "ModelEMA", "seed_everything", "build_optimizer"]

_OPTIMIZERS = {"sgd": 0.01, "adamw": 0.002}   # name -> default learning rate


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ModelEMA:
    """Exponential moving average of a model's floating-point state (parameters and BN buffers).

    The decay ramps up as ``decay * (1 - exp(-updates / tau))`` so early averages follow the model closely.

    Args:
        model (nn.Module): the model being trained.
        decay (float): final decay. Defaults to 0.999.
        tau (float): ramp length in updates. Defaults to 200.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, tau: float = 200.0):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = float(decay), max(float(tau), 1.0), 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1.0 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1.0 - d)
            else:
                v.copy_(msd[k])


def build_optimizer(model: nn.Module, name: str = "sgd", lr: float | None = None, weight_decay: float = 5e-4):
    """SGD (momentum 0.937, Nesterov) or AdamW; weight decay only on conv/linear weights (not BN, not biases).

    Args:
        model (nn.Module): the model.
        name (str): "sgd" or "adamw". Defaults to "sgd".
        lr (float | None): learning rate. Defaults to 0.01 (SGD) or 0.002 (AdamW).
        weight_decay (float): on conv/linear weights. Defaults to 5e-4.

    Returns:
        torch.optim.Optimizer: with param groups in the order (decayed weights, BN weights, biases).
    """
    name = str(name).lower()
    if name not in _OPTIMIZERS:
        raise TrtQatError(f"unknown optimizer '{name}'; use one of {sorted(_OPTIMIZERS)}")
    lr = _OPTIMIZERS[name] if lr is None else float(lr)
    decay, bn, bias = [], [], []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias":
                bias.append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                bn.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": bn, "weight_decay": 0.0},
              {"params": bias, "weight_decay": 0.0}]
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.937, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.937, 0.999))
    for g in opt.param_groups:
        g["initial_lr"] = lr
    return opt


def _lr_at(step: int, total: int, warmup: int, lr: float, lrf: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * lrf``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return lr * (lrf + (1.0 - lrf) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def _resolve_device(device) -> torch.device:
    from trt_qat.config import check_device

    return check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_fp32(data_yaml, model_name: str = "yolo-n", epochs: int = 30, batch_size: int = 32, imgsz: int = 128,
               lr: float | None = None, out="runs/fp32/best.pt", seed: int = 0, workers: int = 0, device=None,
               optimizer: str = "sgd", eval_every: int | None = None, augment: bool = True,
               warmup_epochs: float = 2.0, lrf: float = 0.05, ema_decay: float | None = None,
               max_train_images: int | None = None, max_val_images: int | None = None,
               threads: int | None = None) -> dict:
    """Train a built-in detector from scratch in FP32 and keep the best checkpoint (by val mAP50-95).

    Args:
        data_yaml (str | Path): YOLO ``data.yaml`` with ``train`` and ``val`` splits.
        model_name (str): "yolo-n" or "yolo-s". Defaults to "yolo-n".
        epochs (int): training epochs. Defaults to 30.
        batch_size (int): images per step. Defaults to 32.
        imgsz (int): letterbox size. Defaults to 128.
        lr (float | None): peak learning rate. Defaults to 0.01 for SGD, 0.002 for AdamW.
        out (str | Path): best checkpoint path (written atomically). Defaults to "runs/fp32/best.pt".
        seed (int): seed for python, numpy, torch and the shuffling. Defaults to 0.
        workers (int): data-loader worker processes. Defaults to 0.
        device (str | None): "cpu", "cuda", "cuda:N". Defaults to CUDA when available, else CPU.
        optimizer (str): "sgd" (momentum 0.937, Nesterov) or "adamw". Defaults to "sgd".
        eval_every (int | None): evaluate every N epochs (and always after the last). Defaults to
            ``max(1, epochs // 10)``.
        augment (bool): digit-safe augmentation of the train split. Defaults to True.
        warmup_epochs (float): linear warm-up length (at most a quarter of the run). Defaults to 2.0.
        lrf (float): final learning rate as a fraction of the peak. Defaults to 0.05.
        ema_decay (float | None): EMA decay. Defaults to an averaging window of 5% of the steps (at least 20),
            i.e. ``1 - 1 / max(20, steps / 20)``; the decay ramps up over that many steps.
        max_train_images (int | None): use only the first N training images. Defaults to None (all).
        max_val_images (int | None): evaluate only the first N validation images. Defaults to None (all).
        threads (int | None): ``torch.set_num_threads`` for CPU training. Defaults to torch's choice.

    Returns:
        dict: ``checkpoint``, ``best_epoch``, ``map50``, ``map50_95`` (of the best checkpoint), ``epochs``,
        ``seconds``, ``seconds_per_epoch`` and ``history`` (per evaluated epoch: epoch, loss, map50, map50_95).
    """
    from tqdm import tqdm

    from trt_qat.data.yolo import YoloDataset, build_dataloader
    from trt_qat.fileio import check_writable_file
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.models.loss import YoloLoss
    from trt_qat.models.yolo import build_model, save_checkpoint
    from trt_qat.runners.torch_runner import TorchRunner

    if int(epochs) < 1 or int(batch_size) < 1:
        raise TrtQatError(f"epochs and batch_size must be >= 1 (got {epochs}, {batch_size})")
    if threads:
        torch.set_num_threads(int(threads))
    epochs, batch_size = int(epochs), int(batch_size)
    dev = _resolve_device(device)
    check_writable_file(out)  # before training, not at the first checkpoint
    seed_everything(int(seed))

    train_ds = YoloDataset(data_yaml, "train", imgsz=imgsz, augment=augment, max_images=max_train_images)
    val_ds = YoloDataset(data_yaml, "val", imgsz=imgsz, augment=False, max_images=max_val_images)
    sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(int(seed)))
    loader = build_dataloader(train_ds, batch_size=batch_size, workers=workers, sampler=sampler,
                              drop_last=len(train_ds) > batch_size)
    model = build_model(model_name, nc=train_ds.nc).to(dev)
    criterion = YoloLoss(model)
    opt = build_optimizer(model, optimizer, lr)
    peak_lr = opt.param_groups[0]["initial_lr"]
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    warmup = max(1, min(int(round(warmup_epochs * steps_per_epoch)), total // 4))
    window = max(20.0, total / 20.0)
    ema = ModelEMA(model, decay=ema_decay if ema_decay is not None else 1.0 - 1.0 / window, tau=window)
    eval_every = max(1, int(eval_every) if eval_every else max(1, epochs // 10))
    train_args = {"data": str(data_yaml), "model": model_name, "epochs": epochs, "batch_size": batch_size,
                  "imgsz": imgsz, "lr": peak_lr, "optimizer": optimizer, "seed": int(seed), "augment": bool(augment)}
    LOG.info("training %s on %d images (%d val), %d epochs x %d steps, %s lr %.4g, device %s", model_name,
             len(train_ds), len(val_ds), epochs, steps_per_epoch, optimizer, peak_lr, dev)

    best = {"map50_95": -1.0, "map50": 0.0, "epoch": 0}
    history, step, start = [], 0, time.perf_counter()
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        running, n_batches = torch.zeros(3), 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True)
        for imgs, targets, _metas in bar:
            cur_lr = _lr_at(step, total, warmup, peak_lr, lrf)
            for i, g in enumerate(opt.param_groups):
                if optimizer == "sgd" and step < warmup:
                    # biases start high and momentum low during warm-up (YOLOv5 practice)
                    frac = (step + 1) / warmup
                    g["lr"] = (0.1 * (1 - frac) + cur_lr * frac) if i == 2 else cur_lr
                    g["momentum"] = 0.8 + (0.937 - 0.8) * frac
                else:
                    g["lr"] = cur_lr
            loss, items = criterion(model(imgs.to(dev, non_blocking=True)), targets.to(dev, non_blocking=True))
            if not torch.isfinite(loss):
                raise TrtQatError(f"training loss became {loss.item()} at epoch {epoch}; lower the learning rate "
                                  "(--lr) or check the labels")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            opt.step()
            ema.update(model)
            step += 1
            running += items.cpu()
            n_batches += 1
            bar.set_postfix(box=f"{running[0] / n_batches:.4f}", obj=f"{running[1] / n_batches:.4f}",
                            cls=f"{running[2] / n_batches:.4f}", lr=f"{cur_lr:.2e}")
        bar.close()
        train_seconds += time.perf_counter() - t0
        mean_items = (running / max(n_batches, 1)).tolist()
        if epoch % eval_every == 0 or epoch == epochs:
            metrics = evaluate(TorchRunner(ema.ema, device=dev), val_ds, batch_size=max(batch_size, 16),
                               desc=f"val {epoch}/{epochs}")
            history.append({"epoch": epoch, "loss": sum(mean_items), "box": mean_items[0], "obj": mean_items[1],
                            "cls": mean_items[2], "map50": metrics["map50"], "map50_95": metrics["map50_95"]})
            LOG.info("epoch %d/%d  loss %.4f (box %.4f obj %.4f cls %.4f)  val mAP50 %.4f  mAP50-95 %.4f",
                     epoch, epochs, sum(mean_items), *mean_items, metrics["map50"], metrics["map50_95"])
            if metrics["map50_95"] > best["map50_95"]:
                best = {"map50_95": metrics["map50_95"], "map50": metrics["map50"], "epoch": epoch}
                save_checkpoint(ema.ema, out, epoch=epoch, map50=metrics["map50"], map50_95=metrics["map50_95"],
                                train_args=train_args)
    seconds = time.perf_counter() - start
    result = {"checkpoint": str(Path(out)), "best_epoch": best["epoch"], "map50": best["map50"],
              "map50_95": max(best["map50_95"], 0.0), "epochs": epochs, "seconds": seconds,
              "seconds_per_epoch": train_seconds / epochs, "history": history}
    print(f"trained {model_name} for {epochs} epochs in {seconds:.0f}s ({result['seconds_per_epoch']:.1f}s/epoch): "
          f"best val mAP50 {best['map50']:.4f}, mAP50-95 {result['map50_95']:.4f} at epoch {best['epoch']} "
          f"-> {out}")
    return result
