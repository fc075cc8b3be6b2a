"""FP32 baseline training from scratch (the starting point of PTQ and QAT), on the one training loop.

SGD (Nesterov) or AdamW (:func:`~trt_qat.train.loop.build_optimizer`), linear warm-up then cosine decay
(:func:`~trt_qat.train.loop.warmup_cosine`), an exponential moving average (EMA) of the weights as an after-step
hook, mAP on the validation split every few epochs (through :class:`~trt_qat.runners.torch_runner.TorchRunner` and
:func:`~trt_qat.measure.evaluate.evaluate`, the same path every backend takes) and the best EMA checkpoint kept,
written atomically by the model family's adapter.

Run ``trt-qat train --data datasets/digits-det/data.yaml --epochs 30``.
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
from trt_qat.train.loop import build_optimizer, fit, run_fingerprint, warmup_cosine

__all__ = ["train_fp32", "ModelEMA", "LossItems", "seed_everything", "last_checkpoint_path"]


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

    def after_step(self, loop):
        """Loop hook: update the average after every optimizer step."""
        self.update(loop.model)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.updates = int(state["updates"])


class LossItems:
    """Loop hook: the per-epoch mean of the loss components a ``loss_fn`` leaves in ``loss_fn.last_items``."""

    def __init__(self, loss_fn):
        self.loss_fn, self.epochs, self._running, self._n = loss_fn, [], None, 0

    def after_step(self, loop):
        items = self.loss_fn.last_items.detach().cpu()
        self._running = items if self._running is None else self._running + items
        self._n += 1

    def on_epoch_end(self, loop):
        self.epochs.append((self._running / max(self._n, 1)).tolist() if self._running is not None else [])
        self._running, self._n = None, 0

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = [list(e) for e in state["epochs"]]


class TrainingProgress:
    """Loop hook: tell a loss whose gains follow the training schedule (``loss_fn.progress``, Ultralytics'
    ``E2ELoss``) how far training is, at the start of every epoch: ``epoch / (epochs - 1)``."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def on_epoch_start(self, loop):
        if hasattr(self.loss_fn, "progress"):
            self.loss_fn.progress = loop.epoch / max(loop.epochs - 1, 1)


def last_checkpoint_path(out) -> Path:
    """Where :func:`train_fp32` keeps its resume state for best checkpoint ``out``: ``<out stem>.last.pt``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.last{out.suffix or '.pt'}")


def _resolve_device(device) -> torch.device:
    from trt_qat.config import check_device

    return check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_fp32(data_yaml, model_name: str = "yolo-n", epochs: int = 30, batch_size: int = 32, imgsz: int = 128,
               lr: float | None = None, out="runs/fp32/best.pt", seed: int = 0, workers: int = 0, device=None,
               optimizer: str = "sgd", eval_every: int | None = None, augment: bool = True,
               warmup_epochs: float = 2.0, lrf: float = 0.05, ema_decay: float | None = None,
               max_train_images: int | None = None, max_val_images: int | None = None,
               threads: int | None = None, family: str | None = None, resume: bool = True,
               half: bool = False) -> dict:
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
        family (str | None): the model family (:mod:`trt_qat.models.adapter`). Defaults to the built-in detector.
        resume (bool): continue a killed run of the same settings from ``<out>.last.pt`` (written after every
            epoch with the optimizer, EMA and random states, and removed when the run completes). Defaults to True.
        half (bool): store the best checkpoint's floating-point tensors in FP16 (half the file; every stage loads
            them back into an FP32 model). Training itself is FP32 either way, and a killed run resumes with or
            without it. Defaults to False.

    Returns:
        dict: ``checkpoint``, ``best_epoch``, ``map50``, ``map50_95`` (of the best checkpoint), ``epochs``,
        ``seconds``, ``seconds_per_epoch`` and ``history`` (per evaluated epoch: epoch, loss, map50, map50_95).
    """
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.fileio import check_writable_file
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.models.adapter import get_adapter
    from trt_qat.runners.torch_runner import TorchRunner

    if int(epochs) < 1 or int(batch_size) < 1:
        raise TrtQatError(f"epochs and batch_size must be >= 1 (got {epochs}, {batch_size})")
    if threads:
        torch.set_num_threads(int(threads))
    epochs, batch_size = int(epochs), int(batch_size)
    dev = _resolve_device(device)
    check_writable_file(out)  # before training, not at the first checkpoint
    seed_everything(int(seed))

    adapter = get_adapter(family)
    train_ds = adapter.dataset(data_yaml, "train", imgsz=imgsz, augment=augment, max_images=max_train_images)
    val_ds = adapter.dataset(data_yaml, "val", imgsz=imgsz, augment=False, max_images=max_val_images)
    sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(int(seed)))
    loader = build_dataloader(train_ds, batch_size=batch_size, workers=workers, sampler=sampler,
                              drop_last=len(train_ds) > batch_size)
    model = adapter.build(model_name, nc=train_ds.nc).to(dev)
    loss_fn = adapter.loss_fn(model)
    opt = build_optimizer(model, optimizer, lr)
    peak_lr = opt.param_groups[0]["initial_lr"]
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    warmup = max(1, min(int(round(warmup_epochs * steps_per_epoch)), total // 4))
    window = max(20.0, total / 20.0)
    ema = ModelEMA(model, decay=ema_decay if ema_decay is not None else 1.0 - 1.0 / window, tau=window)
    items = LossItems(loss_fn)
    train_args = {"data": str(data_yaml), "model": model_name, "epochs": epochs, "batch_size": batch_size,
                  "imgsz": imgsz, "lr": peak_lr, "optimizer": optimizer, "seed": int(seed), "augment": bool(augment)}
    LOG.info("training %s on %d images (%d val), %d epochs x %d steps, %s lr %.4g, device %s", model_name,
             len(train_ds), len(val_ds), epochs, steps_per_epoch, optimizer, peak_lr, dev)

    def lr_at(step, total_steps, group):
        lr_now = warmup_cosine(step, total_steps, peak_lr, lrf, warmup, floor_at_last_step=False)
        if optimizer == "sgd" and step < warmup:
            # biases start high and momentum low during warm-up (YOLOv5 practice)
            frac = (step + 1) / warmup
            return (0.1 * (1 - frac) + lr_now * frac) if group == 2 else lr_now, 0.8 + (0.937 - 0.8) * frac
        return lr_now

    def eval_fn(_model):
        epoch = len(items.epochs)  # (on_epoch_end has run)
        metrics = evaluate(TorchRunner(ema.ema, device=dev), val_ds, batch_size=max(batch_size, 16),
                           desc=f"val {epoch}/{epochs}", adapter=adapter)
        return {"score": metrics["map50_95"], "map50": metrics["map50"], "map50_95": metrics["map50_95"]}

    def save_best(_model, path, extra):
        adapter.save(copy.deepcopy(ema.ema).half() if half else ema.ema, path, epoch=extra["epoch"] + 1,
                     map50=extra["map50"], map50_95=extra["map50_95"], train_args=train_args)

    def save_last(_model, path, extra):
        adapter.save(model, path, **extra)

    last = last_checkpoint_path(out)
    eval_every = max(1, int(eval_every) if eval_every else max(1, epochs // 10))
    settings = {**train_args, "warmup_epochs": warmup_epochs, "lrf": lrf, "ema_decay": ema_decay,
                "eval_every": eval_every, "max_train_images": max_train_images, "max_val_images": max_val_images,
                "family": adapter.family}
    start = time.perf_counter()
    result = fit(model, loader, loss_fn, opt, epochs=epochs, lr_at=lr_at, grad_clip=10.0,
                 hooks=[ema, items, TrainingProgress(loss_fn)],
                 eval_fn=eval_fn, eval_every=eval_every, save_fn=save_last, save_best_fn=save_best, best_path=out,
                 last_path=last, resume=resume, fingerprint=run_fingerprint(settings, model),
                 restore_best=False, device=dev, desc="train", what="training")
    last.unlink(missing_ok=True)  # complete: nothing to resume
    seconds = time.perf_counter() - start
    history, item_names = [], getattr(loss_fn, "item_names", ("box", "obj", "cls"))
    for record, mean_items in zip(result["history"], items.epochs):
        if "score" in record:
            history.append({"epoch": record["epoch"], "loss": sum(mean_items), **dict(zip(item_names, mean_items)),
                            "map50": record["map50"], "map50_95": record["map50_95"]})
    best = max(history, key=lambda h: h["map50_95"]) if history else {"epoch": 0, "map50": 0.0, "map50_95": 0.0}
    train_seconds = sum(record.get("seconds", 0.0) for record in result["history"])  # (a resumed run's own)
    result = {"checkpoint": str(Path(out)), "best_epoch": best["epoch"], "map50": best["map50"],
              "map50_95": max(best["map50_95"], 0.0), "epochs": epochs, "seconds": seconds,
              "seconds_per_epoch": train_seconds / epochs, "history": history}
    print(f"trained {model_name} for {epochs} epochs in {seconds:.0f}s ({result['seconds_per_epoch']:.1f}s/epoch): "
          f"best val mAP50 {best['map50']:.4f}, mAP50-95 {result['map50_95']:.4f} at epoch {best['epoch']} "
          f"-> {out}")
    return result
