"""Pruned architectures: rebuild a channel-pruned model from its unpruned architecture plus the pruned layer shapes.

A structurally pruned model (:mod:`trt_qat.prune`) is its family's architecture with fewer channels in some convs,
BatchNorms and linears. Its checkpoints carry the family's usual architecture description plus
``pruned_shapes`` (:data:`PRUNED_KEY`: ``{module name: weight shape}``), so any stage rebuilds it with no extra
flag: the unpruned model is built, then every listed module is re-shaped (:func:`reshape_modules`) before the
weights are loaded.

:func:`support_pruned` adds this to an adapter class; :func:`trt_qat.models.adapter.register_adapter` applies it to
every family, so ``architecture`` / ``from_architecture`` (quantized checkpoints), ``save`` and ``from_checkpoint``
(FP32 checkpoints) all understand pruned models.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from trt_qat.errors import TrtQatError

__all__ = ["PRUNED_KEY", "PRUNED_ATTR", "layer_shapes", "reshape_modules", "pruned_shapes_of", "check_not_pruned",
           "support_pruned", "mark_pruned"]

PRUNED_KEY = "pruned_shapes"
#: set on a model whose channels were pruned: its layer shapes must be saved with its architecture
PRUNED_ATTR = "trt_qat_pruned"
_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm


def _shaped(module) -> bool:
    return isinstance(module, (_CONV, _BN, nn.Linear)) and getattr(module, "weight", None) is not None


def layer_shapes(model: nn.Module) -> dict:
    """``{module name: weight shape}`` of every conv, BatchNorm (with affine weights) and linear of ``model``."""
    return {name: [int(d) for d in m.weight.shape] for name, m in model.named_modules() if _shaped(m)}


def mark_pruned(model: nn.Module) -> nn.Module:
    """Mark ``model`` as pruned (its layer shapes then travel with its architecture); returns it."""
    setattr(model, PRUNED_ATTR, True)
    return model


def _new_param(old, shape):
    data = torch.zeros(shape, dtype=old.dtype, device=old.device)
    return nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data


def _reshape_one(name: str, m: nn.Module, shape: list) -> None:
    shape = [int(d) for d in shape]
    if list(m.weight.shape) == shape:
        return
    if len(shape) != m.weight.dim():
        raise TrtQatError(f"pruned shape {shape} of layer '{name}' does not fit its {type(m).__name__} (weight "
                          f"{list(m.weight.shape)}); the checkpoint belongs to another architecture")
    if isinstance(m, _BN):
        m.num_features = shape[0]
        if m.running_mean is not None:
            m.running_mean = torch.zeros(shape[0], dtype=m.running_mean.dtype, device=m.running_mean.device)
            m.running_var = torch.ones(shape[0], dtype=m.running_var.dtype, device=m.running_var.device)
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = shape[0], shape[1]
    else:  # conv: weight [out, in / groups, k...] (transposed: [in, out / groups, k...])
        depthwise = m.groups > 1 and m.groups == m.in_channels
        if m.transposed:
            m.in_channels, m.out_channels = shape[0], shape[1] * m.groups
        else:
            m.out_channels = shape[0]
            m.groups = shape[0] if depthwise else m.groups
            m.in_channels = shape[1] * m.groups
    m.weight = _new_param(m.weight, shape)
    if getattr(m, "bias", None) is not None:
        m.bias = _new_param(m.bias, [shape[0] if not isinstance(m, _CONV) or not m.transposed else m.out_channels])


def reshape_modules(model: nn.Module, shapes: dict, what: str = "the checkpoint") -> nn.Module:
    """Re-shape ``model``'s convs, BatchNorms and linears in place to ``shapes`` (``{module name: weight shape}``);
    weights of re-shaped modules are zeros until a state dict is loaded. Marks the model pruned; returns it.

    Raises:
        TrtQatError: a listed module is missing or is not a conv/BatchNorm/linear.
    """
    if not isinstance(shapes, dict):
        raise TrtQatError(f"{what}'s pruned_shapes is a {type(shapes).__name__}, not a mapping; re-create it with "
                          "`trt-qat prune`")
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        m = modules.get(name)
        if m is None or not _shaped(m):
            raise TrtQatError(f"{what} lists pruned layer '{name}', which the architecture has no conv/BatchNorm/"
                              "linear of; the checkpoint belongs to another architecture")
        _reshape_one(name, m, shape)
    return mark_pruned(model)


def pruned_shapes_of(ckpt) -> dict | None:
    """The pruned layer shapes a checkpoint dict carries (top level, or in its ``model_cfg``), or None."""
    if not isinstance(ckpt, dict):
        return None
    cfg = ckpt.get("model_cfg")
    return ckpt.get(PRUNED_KEY) or (cfg.get(PRUNED_KEY) if isinstance(cfg, dict) else None)


def check_not_pruned(model: nn.Module, state_dict, path="<checkpoint>") -> None:
    """Refuse a state dict whose layers have fewer channels than ``model``'s (a pruned checkpoint loaded into the
    unpruned architecture) with one line that says so."""
    if not isinstance(state_dict, dict):
        return
    for name, shape in layer_shapes(model).items():
        have = state_dict.get(f"{name}.weight")
        if have is not None and hasattr(have, "shape") and list(have.shape) != shape:
            raise TrtQatError(f"checkpoint '{path}' holds a pruned model (layer '{name}' has weight "
                              f"{list(have.shape)}, the unpruned architecture {shape}) but no pruned shapes to "
                              "rebuild it from; load the file `trt-qat prune` wrote (it carries them), not its "
                              "state_dict alone")


def _strip(arch):
    return {k: v for k, v in arch.items() if k != PRUNED_KEY} if isinstance(arch, dict) else arch


def support_pruned(cls):
    """Give adapter class ``cls`` pruned-model support (see the module docstring); returns it. Idempotent."""
    if getattr(cls, "_trt_qat_pruned_support", None) is cls:
        return cls
    architecture, from_architecture = cls.architecture, cls.from_architecture
    save, from_checkpoint = cls.save, cls.from_checkpoint

    @functools.wraps(architecture)
    def architecture_(self, model):
        arch = architecture(self, model)
        if arch is not None and getattr(model, PRUNED_ATTR, False):
            arch = {**arch, PRUNED_KEY: layer_shapes(model)}
        return arch

    @functools.wraps(from_architecture)
    def from_architecture_(self, arch):
        model = from_architecture(self, _strip(arch))
        shapes = arch.get(PRUNED_KEY) if isinstance(arch, dict) else None
        return reshape_modules(model, shapes) if shapes else model

    @functools.wraps(save)
    def save_(self, model, path, **extra):
        if getattr(model, PRUNED_ATTR, False):
            extra = {**extra, PRUNED_KEY: layer_shapes(model)}
        return save(self, model, path, **extra)

    @functools.wraps(from_checkpoint)
    def from_checkpoint_(self, ckpt, path="<checkpoint>"):
        shapes = pruned_shapes_of(ckpt)
        if not shapes or ckpt.get("format") == "trt_qat.quantized/1" or not isinstance(ckpt.get("state_dict"), dict):
            try:
                return from_checkpoint(self, ckpt, path)
            except TrtQatError:
                if isinstance(ckpt, dict) and isinstance(ckpt.get("model_cfg"), dict) and not shapes:
                    try:
                        bare = from_architecture(self, ckpt["model_cfg"])
                    except TrtQatError:
                        bare = None
                    if bare is not None:
                        check_not_pruned(bare, ckpt.get("state_dict"), path)
                raise
        model = reshape_modules(from_architecture(self, _strip(ckpt.get("model_cfg"))), shapes, f"'{path}'")
        try:
            model.load_state_dict(ckpt["state_dict"])
        except (RuntimeError, KeyError) as exc:
            raise TrtQatError(f"checkpoint '{path}' does not match its pruned architecture "
                              f"({str(exc).strip().splitlines()[-1].strip()[:200]}); re-create it with "
                              "`trt-qat prune`") from None
        return model.eval()

    cls.architecture, cls.from_architecture = architecture_, from_architecture_
    cls.save, cls.from_checkpoint = save_, from_checkpoint_
    cls._trt_qat_pruned_support = cls
    return cls
