"""Fine-tune a pruned or 2:4-sparsified FP32 model: the training loop with an EMA of the weights, best epoch by val
mAP50-95, 2:4 masks re-applied after every step (when the model holds the pattern), and, when the unpruned model
is given, output distillation from it (the head outputs keep their shapes when channels are pruned; the features do
not, so the feature loss is not used)."""
from __future__ import annotations

import torch
from torch import nn

from trt_qat.errors import LOG, TrtQatError
from trt_qat.prune.sparsity import DEFAULT_MIN_CHANNELS, sparsity_hook

__all__ = ["finetune_fp32", "teacher_for", "has_output_distill"]


def teacher_for(ckpt: dict, teacher=None):
    """The FP32 teacher model for a pruned checkpoint dict: ``teacher`` (a path) when given, else the unpruned
    checkpoint it was pruned from when that file still exists, else None."""
    from pathlib import Path

    from trt_qat.models.adapter import load_fp32

    path = teacher or (ckpt.get("pruned_from") if isinstance(ckpt, dict) else None)
    if not path:
        return None
    if not Path(path).is_file():
        if teacher:
            raise TrtQatError(f"--teacher '{teacher}' does not exist; give the unpruned FP32 checkpoint")
        LOG.warning("the unpruned checkpoint %s is gone: fine-tuning without distillation", path)
        return None
    return load_fp32(path)[0]


def has_output_distill(adapter) -> bool:
    """Whether ``adapter``'s family defines an output distillation loss (the head outputs' shapes survive pruning;
    the features' do not, so it is the only distillation a pruned student can use)."""
    from trt_qat.models.adapter import ModelAdapter

    return type(adapter).distill_output_loss is not ModelAdapter.distill_output_loss


def finetune_fp32(model: nn.Module, adapter, data_yaml, epochs: int = 10, lr: float | None = None,
                  optimizer: str = "sgd", imgsz: int = 128, batch_size: int = 16, max_steps: int | None = None,
                  teacher_model: nn.Module | None = None, distill_weight: float = 1.0, hooks=(),
                  min_channels: int = DEFAULT_MIN_CHANNELS, max_val_images: int | None = None, workers: int = 0,
                  seed: int = 0, augment: bool = True, progress: bool = True) -> dict:
    """Fine-tune ``model`` (FP32, in place; it ends with the best epoch's EMA weights).

    Args:
        model (nn.Module): the pruned or sparsified FP32 model.
        adapter (ModelAdapter): its family (dataset, loss, decode).
        data_yaml (str | Path): YOLO data.yaml with train and val splits.
        epochs (int): Defaults to 10.
        lr (float | None): peak learning rate (cosine to 5%). Defaults to 0.005 (SGD) or 5e-4 (AdamW).
        optimizer (str): "sgd" or "adamw". Defaults to "sgd".
        imgsz (int): letterbox size. Defaults to 128.
        batch_size (int): Defaults to 16.
        max_steps (int | None): cap on steps per epoch. Defaults to the whole split.
        teacher_model (nn.Module | None): the unpruned FP32 model for output distillation. Defaults to none.
        distill_weight (float): the distillation term's weight. Defaults to 1.0.
        hooks (Sequence): more loop hooks. 2:4 masks are added by themselves when convs hold the pattern.
        min_channels (int): the 2:4 eligibility threshold for finding sparse convs. Defaults to 256.
        max_val_images (int | None): evaluate on the first N val images. Defaults to all.

    Returns:
        dict: ``map50``, ``map50_95``, ``best_epoch``, ``history``, ``sparse_layers`` (masked conv count).
    """
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.runners.torch_runner import TorchRunner
    from trt_qat.train.fp32 import ModelEMA, seed_everything
    from trt_qat.train.loop import Teacher, build_optimizer, fit, warmup_cosine

    seed_everything(int(seed))
    train_ds = adapter.dataset(data_yaml, "train", imgsz=imgsz, augment=augment)
    val_ds = adapter.dataset(data_yaml, "val", imgsz=imgsz, augment=False, max_images=max_val_images)
    adapter.check_dataset(model, train_ds, "--data")
    sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(int(seed)))
    loader = build_dataloader(train_ds, batch_size=batch_size, workers=workers, sampler=sampler,
                              drop_last=len(train_ds) > batch_size)
    masks = sparsity_hook(model, min_channels)
    all_hooks = [h for h in (masks,) if h is not None] + list(hooks)
    if masks is not None:
        masks.apply(model)
    lr = float(lr) if lr is not None else (0.005 if optimizer == "sgd" else 5e-4)
    opt = build_optimizer(model, optimizer, lr)
    steps = min(len(loader), max_steps) if max_steps else len(loader)
    window = max(20.0, epochs * steps / 20.0)
    ema = ModelEMA(model, decay=1.0 - 1.0 / window, tau=window)
    task = adapter.loss_fn(model)
    teacher, loss_fn = None, task
    if teacher_model is not None and not has_output_distill(adapter):
        LOG.warning("model family '%s' has no output distillation: fine-tuning on the labels alone", adapter.family)
        teacher_model = None
    if teacher_model is not None:
        from trt_qat.train.distill import DistillLoss, check_teacher

        check_teacher(teacher_model)
        loss_fn = DistillLoss(model, adapter, "output", task_loss=task, weight=distill_weight)
        teacher = Teacher(teacher_model)
    best = {"map50_95": -1.0, "state": None, "epoch": 0, "map50": 0.0}

    def eval_fn(_model):
        metrics = evaluate(TorchRunner(ema.ema), val_ds, batch_size=max(batch_size, 16), desc="val", adapter=adapter)
        if metrics["map50_95"] > best["map50_95"]:
            best.update(map50_95=metrics["map50_95"], map50=metrics["map50"], epoch=len(history) + 1,
                        state={k: v.detach().clone() for k, v in ema.ema.state_dict().items()})
        history.append({"map50": metrics["map50"], "map50_95": metrics["map50_95"]})
        return {"score": metrics["map50_95"], "map50": metrics["map50"], "map50_95": metrics["map50_95"]}

    history: list = []
    LOG.info("fine-tuning %d epochs x %d steps, %s lr %.3g%s%s", epochs, steps, optimizer, lr,
             ", distilling from the unpruned model" if teacher else "",
             f", 2:4 masks on {len(masks.masks)} convs" if masks else "")
    fit(model, loader, loss_fn, opt, epochs=int(epochs), steps_per_epoch=max_steps,
        lr_at=lambda step, total, _g: warmup_cosine(step, total, lr, 0.05), teacher=teacher,
        hooks=[*all_hooks, ema], eval_fn=eval_fn, restore_best=False, progress=progress, desc="finetune",
        what="fine-tuning")
    model.load_state_dict(best["state"])
    if masks is not None:
        masks.apply(model)
    model.eval()
    return {"map50": best["map50"], "map50_95": best["map50_95"], "best_epoch": best["epoch"], "history": history,
            "sparse_layers": len(masks.masks) if masks else 0}
