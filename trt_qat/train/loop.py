"""The one training loop, for FP32 training and QAT alike, with hooks for what else plugs in.

:func:`fit` owns the optimizer steps, the learning-rate schedule, atomic checkpoints (``last`` every epoch, ``best``
when the score improves), resume from ``last`` and best-by-score, and DistributedDataParallel around the trainable
model only. It knows nothing of quantization or of a model family: the caller gives ``loss_fn(net, batch)``, an
optimizer (:func:`build_optimizer`), a schedule (:func:`warmup_cosine`) and hooks.

Extension points (timm's ``task`` split in spirit: the loop stays the same, what it drives changes):

* ``teacher``: a frozen model (:class:`Teacher`: eval mode, no gradients, on the student's device, outside DDP).
  When given, the loss is called as ``loss_fn(net, batch, teacher)``: distillation plugs in here.
* ``hooks``: objects with any of ``on_epoch_start(loop)``, ``after_step(loop)`` and ``on_epoch_end(loop)``.
  ``after_step`` runs right after ``optimizer.step()`` (an EMA update, re-applying 2:4 sparsity masks);
  ``on_epoch_start`` runs after the model is put in train mode (freezing BatchNorm statistics), ``on_epoch_end``
  before evaluation (refreshing weight scales).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trt_qat import dist
from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import read_checkpoint

__all__ = ["fit", "run_fingerprint", "build_optimizer", "warmup_cosine", "Teacher", "LoopState", "FreezeBatchNorm",
           "OPTIMIZERS"]

#: optimizer name -> default peak learning rate
OPTIMIZERS = {"sgd": 0.01, "adamw": 0.002}


def build_optimizer(model: nn.Module, name: str = "sgd", lr: float | None = None, weight_decay: float = 5e-4,
                    momentum: float = 0.937):
    """SGD (Nesterov) or AdamW with weight decay only on weights (not on BatchNorm parameters, not on biases).

    Args:
        model (nn.Module): the model; parameters that do not require grad are left out.
        name (str): "sgd" or "adamw". Defaults to "sgd".
        lr (float | None): learning rate. Defaults to 0.01 (SGD) or 0.002 (AdamW).
        weight_decay (float): on conv/linear weights. Defaults to 5e-4.
        momentum (float): SGD momentum, or AdamW's beta1. Defaults to 0.937.

    Returns:
        torch.optim.Optimizer: param groups in the order (decayed weights, BatchNorm weights, biases), each with
        ``initial_lr`` set.
    """
    name = str(name).lower()
    if name not in OPTIMIZERS:
        raise TrtQatError(f"unknown optimizer '{name}'; use one of {sorted(OPTIMIZERS)}")
    lr = OPTIMIZERS[name] if lr is None else float(lr)
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
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    for g in opt.param_groups:
        g["initial_lr"] = lr
    return opt


def warmup_cosine(step: int, total: int, lr: float, final_ratio: float = 0.01, warmup: int = 0,
                  floor_at_last_step: bool = True) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay towards ``lr * final_ratio``.

    Args:
        step (int): the global step (0-based).
        total (int): steps in the whole run.
        lr (float): peak learning rate.
        final_ratio (float): the floor as a fraction of ``lr``. Defaults to 0.01.
        warmup (int): warm-up steps. Defaults to 0.
        floor_at_last_step (bool): reach the floor exactly at the last step (``total - 1``; QAT's schedule), or
            decay over ``total - warmup`` steps, a step short of the floor (the FP32 recipe, kept so that
            ``make baseline`` re-creates the committed baseline bit for bit). Defaults to True.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if not floor_at_last_step:
        t = min((step - warmup) / max(total - warmup, 1), 1.0)
        return lr * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))
    span = total - warmup - 1
    if span <= 0:
        return lr
    t = min(step - warmup, span) / span
    floor = lr * final_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


class Teacher:
    """A frozen model whose outputs a loss may use: eval mode, no gradients, never wrapped in DDP.

    Args:
        model (nn.Module): the teacher (for QAT, the FP32 model the quantized one came from).
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device):
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, x):
        self.model.eval()
        return self.model(x)


class FreezeBatchNorm:
    """Hook: keep BatchNorm running statistics fixed (its layers in eval mode while the rest trains)."""

    def on_epoch_start(self, loop):
        for m in loop.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@dataclass
class LoopState:
    """What :func:`fit` keeps across epochs, passed to every hook as ``loop``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int
    epoch: int = 0                  # 0-based, the current epoch
    step: int = 0                   # global step of the next optimizer step
    loss: float = 0.0               # the last step's loss
    history: list = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    first_loss: float | None = None  # the run's first step loss: the divergence check's reference


def run_fingerprint(settings, *models: nn.Module) -> str:
    """A hex digest that identifies a run by content: ``settings`` (anything JSON can write) and the starting
    weights of ``models`` (every tensor of their state dicts, by name). A ``last`` checkpoint is resumed only by
    a run with the same fingerprint; re-writing an identical checkpoint file does not change it."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for model in models:
        for name, value in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(str(value.dtype).encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _steps_per_epoch(data, cap: int | None) -> int:
    steps = len(data) if hasattr(data, "__len__") else None
    if cap:
        steps = cap if steps is None else min(steps, cap)
    if not steps:
        raise TrtQatError("the training data is empty or has no length; pass a DataLoader with batches")
    return steps


def _rng_state(data) -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    gen = getattr(getattr(data, "sampler", None), "generator", None)
    if isinstance(gen, torch.Generator):
        state["sampler"] = gen.get_state()
    return state


def _set_rng_state(data, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen = getattr(getattr(data, "sampler", None), "generator", None)
    if "sampler" in state and isinstance(gen, torch.Generator):
        gen.set_state(state["sampler"])


def _resume(path: Path, loop: LoopState, fingerprint, data, what: str, hooks):
    """Load ``path`` (``last``) into ``loop`` when it was written by the same run; returns whether it did."""
    try:
        state = read_checkpoint(path)
    except TrtQatError as exc:
        raise TrtQatError(f"{exc}; or to start afresh, delete {path} (--no-resume ignores it)") from None
    if not {"state_dict", "optimizer", "epoch"} <= set(state):
        raise TrtQatError(f"{path} is not a {what} checkpoint (no state_dict/optimizer/epoch); delete it or choose "
                          "another --out")
    if state.get("fingerprint") != fingerprint:
        LOG.warning("not resuming from %s: it was written by a different run (config or starting weights changed); "
                    "starting afresh", path)
        return False
    try:
        loop.model.load_state_dict(state["state_dict"])
        loop.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0][:160]
        raise TrtQatError(f"{path} was written by a different {what} run and cannot be resumed ({detail}); delete "
                          "it, pass --no-resume, or choose another --out") from None
    loop.epoch = state["epoch"] + 1
    loop.step = loop.epoch * loop.steps_per_epoch
    loop.history = state.get("history", [])
    loop.best_score, loop.best_epoch = state.get("best_score"), state.get("best_epoch")
    loop.first_loss = state.get("first_loss")
    for hook, hook_state in zip(hooks, state.get("hooks") or []):
        if hook_state is not None and hasattr(hook, "load_state_dict"):
            hook.load_state_dict(hook_state)
    if state.get("rng"):
        _set_rng_state(data, state["rng"])
    LOG.info("resuming from %s (epoch %d of %d)", path, loop.epoch + 1, loop.epochs)
    return True


def _call_hooks(hooks, event: str, loop: LoopState) -> None:
    for hook in hooks:
        fn = getattr(hook, event, None)
        if fn is not None:
            fn(loop)


def fit(model: nn.Module, data, loss_fn, optimizer, *, epochs: int, lr_at, steps_per_epoch: int | None = None,
        grad_clip: float | None = 10.0, teacher: Teacher | None = None, hooks=(), eval_fn=None, eval_every: int = 1,
        higher_is_better: bool = True, save_fn=None, save_best_fn=None, last_path=None, best_path=None,
        resume: bool = True, fingerprint: str | None = None, restore_best: bool = True, device=None,
        progress: bool = True,
        desc: str = "train", what: str = "training", diverge_factor: float | None = 1e3,
        is_main_process: bool | None = None) -> dict:
    """Train ``model`` on ``data`` for ``epochs`` epochs.

    Under torchrun (a torch.distributed group is up, :mod:`trt_qat.dist`) the model, and only the model, is wrapped
    in ``DistributedDataParallel``; ``data.sampler.set_epoch(epoch)`` is called when the sampler has it;
    ``eval_fn`` runs on the main process and its score is broadcast; only the main process writes checkpoints.

    Args:
        model (nn.Module): the trainable model.
        data (Iterable): batches, re-iterated every epoch (a DataLoader).
        loss_fn (Callable): ``loss_fn(net, batch) -> scalar``, or ``loss_fn(net, batch, teacher)`` with a teacher.
        optimizer (torch.optim.Optimizer): e.g. :func:`build_optimizer`.
        epochs (int): epochs in all (a resumed run continues up to this).
        lr_at (Callable): ``lr_at(step, total_steps, group_index) -> lr`` for each param group, or a
            ``(lr, momentum)`` pair to set the momentum too (SGD warm-up).
        steps_per_epoch (int | None): cap on steps per epoch. Defaults to ``len(data)``.
        grad_clip (float | None): max gradient norm. Defaults to 10.0.
        teacher (Teacher | None): a frozen teacher for the loss. Defaults to None.
        hooks (Sequence): objects with ``on_epoch_start``/``after_step``/``on_epoch_end(loop)``; a hook with
            ``state_dict()``/``load_state_dict()`` has its state saved in ``last`` and restored on resume. Defaults
            to none.
        eval_fn (Callable | None): ``eval_fn(model) -> float | dict`` (a dict has a ``"score"``), run after every
            ``eval_every`` epochs and after the last. Defaults to None.
        eval_every (int): Defaults to 1.
        higher_is_better (bool): Defaults to True.
        save_fn (Callable | None): ``save_fn(model, path, extra: dict)`` writes a checkpoint atomically; ``extra``
            holds the 0-based ``epoch`` and the eval entries for ``best``, the resume state for ``last``. Defaults
            to None (no checkpoints).
        save_best_fn (Callable | None): writes ``best`` instead of ``save_fn`` (e.g. an EMA of the weights).
            Defaults to ``save_fn``.
        last_path (str | Path | None): written every epoch (with optimizer and RNG states), resumed from.
        best_path (str | Path | None): written when the score improves.
        resume (bool): continue from ``last_path`` when it exists and has the same ``fingerprint``. Defaults to
            True.
        fingerprint (str | None): identifies the run; a ``last`` written under another is not resumed from.
        restore_best (bool): load the best epoch's weights into ``model`` at the end. Defaults to True.
        device (torch.device | None): Defaults to the model's device.
        progress (bool): tqdm bars. Defaults to True.
        desc (str): progress-bar and log label. Defaults to "train".
        what (str): what the run is called in messages ("QAT"). Defaults to "training".
        diverge_factor (float | None): stop with one TrtQatError when a step's loss exceeds this many times the
            first step's (the run diverged), as well as on a non-finite loss or weight. Defaults to 1e3; None turns
            the ratio check off.
        is_main_process (bool | None): whether this process evaluates and writes. Defaults to rank 0.

    Returns:
        dict: ``history`` (one record per epoch: ``epoch``, ``loss``, ``seconds``, ``lr_end``, and ``score`` plus
        the eval dict's entries when evaluated), ``best_score``, ``best_epoch``.
    """
    from tqdm import tqdm

    main = dist.is_main_process() if is_main_process is None else bool(is_main_process)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    loop = LoopState(model, optimizer, int(epochs), _steps_per_epoch(data, steps_per_epoch))
    total = loop.steps_per_epoch * loop.epochs
    last_path = Path(last_path) if last_path else None
    best_path = Path(best_path) if best_path else None
    best_state = None
    if last_path and resume and last_path.is_file() and _resume(last_path, loop, fingerprint, data, what, hooks):
        if restore_best and best_path and best_path.is_file() and loop.best_epoch is not None:
            best_state = read_checkpoint(best_path)["state_dict"]

    net = model
    if dist.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = getattr(data, "sampler", None)

    def better(score):
        if loop.best_score is None:
            return True
        return score > loop.best_score if higher_is_better else score < loop.best_score

    for epoch in range(loop.epoch, loop.epochs):
        loop.epoch = epoch
        net.train()
        _call_hooks(hooks, "on_epoch_start", loop)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        t0, running, n = time.time(), 0.0, 0
        bar = tqdm(data, total=loop.steps_per_epoch, desc=f"{desc} {epoch + 1}/{loop.epochs}", leave=False,
                   disable=not (progress and main), dynamic_ncols=True)
        for i, batch in enumerate(bar):
            if i >= loop.steps_per_epoch:
                break
            loop.step = epoch * loop.steps_per_epoch + i
            for g, group in enumerate(optimizer.param_groups):
                value = lr_at(loop.step, total, g)
                if isinstance(value, tuple):
                    group["lr"], group["momentum"] = value
                else:
                    group["lr"] = value
            loss = loss_fn(net, batch) if teacher is None else loss_fn(net, batch, teacher)
            value = float(loss.detach())
            if loop.first_loss is None:
                loop.first_loss = value
            first = loop.first_loss
            if not math.isfinite(value) or (diverge_factor and value > diverge_factor * max(abs(first), 1e-2)):
                raise TrtQatError(f"{what} diverged: the loss went from {first:.4g} to {value:.4g} at epoch "
                                  f"{epoch + 1} step {i}; lower --lr (now {optimizer.param_groups[0]['initial_lr']:g}) "
                                  "or check the inputs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            loop.loss = value
            _call_hooks(hooks, "after_step", loop)
            running += loop.loss
            n += 1
            bar.set_postfix(loss=f"{running / n:.4f}")
        bar.close()
        bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise TrtQatError(f"{what} diverged: weight '{bad}' is no longer finite after epoch {epoch + 1}; lower "
                              f"--lr (now {optimizer.param_groups[0]['initial_lr']:g}) or check the inputs")
        loop.step = (epoch + 1) * loop.steps_per_epoch
        _call_hooks(hooks, "on_epoch_end", loop)
        record = {"epoch": epoch + 1, "loss": dist.all_reduce_mean(running / max(n, 1)),
                  "seconds": time.time() - t0, "lr_end": optimizer.param_groups[0]["lr"]}
        if eval_fn is not None and ((epoch + 1) % max(int(eval_every), 1) == 0 or epoch + 1 == loop.epochs):
            model.eval()
            result = dist.broadcast_object(eval_fn(model) if main else None)
            extra = dict(result) if isinstance(result, dict) else {"score": float(result)}
            record.update(extra)
            score = float(extra["score"])
            if better(score):
                loop.best_score, loop.best_epoch = score, epoch + 1
                if restore_best:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if best_path and (save_best_fn or save_fn) and main:
                    (save_best_fn or save_fn)(model, best_path, {"epoch": epoch, **extra})
        loop.history.append(record)
        LOG.info("%s epoch %d/%d loss %.4f%s (%.0fs)", desc, epoch + 1, loop.epochs, record["loss"],
                 f" score {record['score']:.4f}" if "score" in record else "", record["seconds"])
        if last_path and save_fn and main:
            save_fn(model, last_path, {
                # no wall-clock times: the same run writes the same bytes
                "optimizer": optimizer.state_dict(), "epoch": epoch,
                "history": [{k: v for k, v in r.items() if k != "seconds"} for r in loop.history],
                "best_score": loop.best_score, "best_epoch": loop.best_epoch, "fingerprint": fingerprint,
                "first_loss": loop.first_loss,
                "rng": _rng_state(data),
                "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks]})
    dist.barrier()  # the main process's checkpoints are on disk before any process goes on
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"history": loop.history, "best_score": loop.best_score, "best_epoch": loop.best_epoch}
