"""Distillation QAT: the FP32 model teaches its quantized copy, with or without labels.

The teacher rides the training loop's ``teacher`` hook (:class:`~trt_qat.train.loop.Teacher`: frozen, eval-mode
BatchNorm, no gradients, outside DDP), so the loop is the one FP32 training and plain QAT use.

* ``feature``: MSE between the outputs of matching blocks of student and teacher: every top-level block of the
  detector (its direct children that hold parameters), or the modules named in the config. Each block's MSE is
  divided by the mean square of the teacher's output for that block (a relative error), so that a block with large
  activations does not dominate and the loss is the mean relative error over blocks. This is the recipe NVIDIA's
  ``yolov7_qat`` uses, normalised.
* ``output``: a loss on the raw head outputs suited to what they mean, given by the model family
  (:meth:`~trt_qat.models.adapter.ModelAdapter.distill_output_loss`).
* ``both``: their sum.

With labels, the loss is ``task + weight * distillation`` from one student forward (the hooks capture the blocks
of the forward the task loss runs). Without labels (:class:`ImageFolder`: nothing reads a label file), it is the
distillation alone, and the best epoch is chosen by the distillation loss on held-out images (lower is better).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from trt_qat.config import DISTILL_MODES
from trt_qat.errors import TrtQatError

__all__ = ["DISTILL_MODES", "distill_blocks", "DistillLoss", "teacher_from_student", "check_teacher", "make_distill",
           "held_out_distill_score", "split_held_out"]



def distill_blocks(model: nn.Module, names=None) -> list:
    """The module names whose outputs the feature loss compares: ``names`` when given (each must match a module),
    else every top-level block of ``model`` that holds parameters (for a wrapped model, its single child's
    blocks)."""
    modules = dict(model.named_modules())
    if names:
        missing = [n for n in names if n not in modules]
        if missing:
            raise TrtQatError(f"distillation block(s) {missing} match no module of the model; use names such as "
                              f"{[n for n, _ in model.named_children()][:4]}")
        return list(names)
    children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
    if len(children) == 1 and isinstance(children[0][1], (nn.Sequential, nn.ModuleList)):
        prefix, inner = children[0]  # e.g. an Ultralytics DetectionModel: .model is the sequence of blocks
        return [f"{prefix}.{n}" for n, m in inner.named_children() if any(True for _ in m.parameters())]
    return [n for n, _ in children]


def check_teacher(teacher: nn.Module) -> None:
    """Refuse a quantized teacher: the teacher is the FP32 model the student came from."""
    from trt_qat.quant.quantizer import iter_quantizers, quantizer_enabled

    if any(quantizer_enabled(q) for _, q in iter_quantizers(teacher)):
        raise TrtQatError("the distillation teacher is quantized; give the FP32 checkpoint the quantized one came "
                          "from (--teacher W.pt), or leave --teacher out to use the student's own FP32 weights")


def teacher_from_student(student: nn.Module) -> nn.Module:
    """A copy of ``student`` with every quantizer disabled: exactly the FP32 model a calibrated checkpoint came
    from (calibration changes no weight)."""
    import copy

    from trt_qat.quant.quantizer import iter_quantizers

    teacher = copy.deepcopy(student)
    for _, q in iter_quantizers(teacher):
        q.disable()
    return teacher


@contextlib.contextmanager
def _capture(model: nn.Module, names: list, store: dict):
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out))
               for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _relative_mse(student, teacher, name: str) -> torch.Tensor:
    s, t = _tensors(student), _tensors(teacher)
    if len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise TrtQatError(f"the teacher's block '{name}' outputs {[list(b.shape) for b in t]}, the student's "
                          f"{[list(a.shape) for a in s]}; the teacher must be the same architecture as the student")
    terms = [nn.functional.mse_loss(a.float(), b.float()) / (b.float().pow(2).mean() + 1e-8) for a, b in zip(s, t)]
    return torch.stack(terms).mean()


@contextlib.contextmanager
def _frozen_train_mode(model: nn.Module):
    """Train-mode forward (the head's raw outputs, as the student's) with BatchNorm statistics fixed."""
    was = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield model
    finally:
        model.train(was)


class DistillLoss:
    """``loss(net, batch, teacher)`` for the loop (see the module docstring).

    Args:
        student (nn.Module): the quantized model being trained (not its DDP wrapper).
        adapter (ModelAdapter): the model family (its output loss, and its task loss with labels).
        mode (str): "feature", "output" or "both".
        blocks (list[str] | None): module names for the feature loss. Defaults to every top-level block.
        task_loss (Callable | None): ``task_loss(net, batch)``, the detection loss; None without labels.
        weight (float): the distillation term's weight next to the task loss. Defaults to 1.0.
    """

    def __init__(self, student: nn.Module, adapter, mode: str = "feature", blocks=None, task_loss=None,
                 weight: float = 1.0):
        if mode not in DISTILL_MODES:
            raise TrtQatError(f"unknown distillation mode '{mode}'; choose one of {', '.join(DISTILL_MODES)}")
        self.adapter, self.mode, self.task_loss, self.weight = adapter, mode, task_loss, float(weight)
        self.blocks = distill_blocks(student, blocks) if mode in ("feature", "both") else []
        self.head = distill_blocks(student)[-1] if mode in ("output", "both") else None
        self.last_items = None

    def _names(self) -> list:
        return list(dict.fromkeys([*self.blocks, *([self.head] if self.head else [])]))

    def __call__(self, net, batch, teacher):
        model = net.module if hasattr(net, "module") else net  # under DDP the hooks go on the wrapped model
        imgs = batch[0].to(next(model.parameters()).device, non_blocking=True)
        names = self._names()
        student_out, teacher_out = {}, {}
        with _capture(model, names, student_out):
            if self.task_loss is not None:
                task = self.task_loss(net, batch)
            else:  # label-free: the student's forward only feeds the captured blocks
                net(imgs)
                task = torch.zeros((), device=imgs.device)
        with _capture(teacher.model, names, teacher_out), _frozen_train_mode(teacher.model), torch.no_grad():
            teacher.model(imgs)
        distill = torch.zeros((), device=imgs.device)
        if self.blocks:
            distill = distill + torch.stack([_relative_mse(student_out[n], teacher_out[n], n)
                                             for n in self.blocks]).mean()
        if self.head:
            distill = distill + self.adapter.distill_output_loss(student_out[self.head], teacher_out[self.head])
        self.last_items = torch.stack([task.detach().sum(), distill.detach()])
        # the detection losses are sums over the batch's images: the distillation term is scaled the same way
        return task + self.weight * distill * imgs.shape[0]


def make_distill(student: nn.Module, adapter, config, labels: bool = True, teacher_model: nn.Module | None = None):
    """``(loss_fn, Teacher)`` for :func:`~trt_qat.train.qat.finetune` from a :class:`~trt_qat.config.DistillConfig`.

    Args:
        student (nn.Module): the calibrated quantized model.
        adapter (ModelAdapter): its family.
        config (DistillConfig): mode, weight, blocks.
        labels (bool): mix in the detection loss (the batches carry labels). Defaults to True.
        teacher_model (nn.Module | None): the FP32 teacher. Defaults to the student's own FP32 weights
            (:func:`teacher_from_student`).
    """
    from trt_qat.train.loop import Teacher

    teacher_model = teacher_from_student(student) if teacher_model is None else teacher_model
    check_teacher(teacher_model)
    loss = DistillLoss(student, adapter, config.mode, config.blocks,
                       task_loss=adapter.loss_fn(student) if labels else None, weight=config.weight)
    return loss, Teacher(teacher_model)


def split_held_out(dataset, every: int = 10):
    """``(train, held_out)`` subsets: every ``every``-th image is held out (at least one; all when only one)."""
    from torch.utils.data import Subset

    n = len(dataset)
    held = list(range(0, n, every)) or [0]
    held_set = set(held)
    train = [i for i in range(n) if i not in held_set] or held
    return Subset(dataset, train), Subset(dataset, held)


@torch.no_grad()
def held_out_distill_score(student: nn.Module, loss: DistillLoss, teacher, batches) -> float:
    """The label-free score that picks the best epoch: the mean distillation term over held-out batches (lower is
    better), the student run as in training (raw head outputs, BatchNorm statistics fixed)."""
    total, n = 0.0, 0
    task, loss.task_loss = loss.task_loss, None
    try:
        with _frozen_train_mode(student):
            for batch in batches:
                loss(student, batch, teacher)
                total += float(loss.last_items[1])
                n += 1
    finally:
        loss.task_loss = task
    if n == 0:
        raise TrtQatError("no held-out images to score label-free distillation; give more images")
    return total / n
