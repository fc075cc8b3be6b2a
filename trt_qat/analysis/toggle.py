"""Which layers of a quantized model are quantized, and putting some of them in float.

A *layer* is a module that owns quantizers directly (``_input_quantizer``, ``_weight_quantizer``, or the input
quantizers of a quantized elementwise module): a quantized Conv/ConvTranspose/Linear, a quantized pool, a
``QuantAdd``.

A layer is put in float by swapping its quantizer attributes for ``nn.Identity`` *on that module only*, and
restored afterwards, so quantizers shared with other layers (scale-sharing rules) keep quantizing those layers
and no quantizer's state (enabled flag, amax, calibrator) is ever touched.
"""
from __future__ import annotations

import contextlib
import copy

from torch import nn

from trt_qat.errors import TrtQatError
from trt_qat.quant.quantizer import quantizer_enabled

__all__ = ["is_quantizer", "owned_quantizers", "layer_table", "list_layers", "resolve_layers", "set_layers_float",
           "layers_in_float", "make_float_permanent"]


def is_quantizer(module) -> bool:
    """Whether ``module`` is a pytorch-quantization ``TensorQuantizer`` (a ``TrtQuantizer`` included)."""
    from pytorch_quantization.nn import TensorQuantizer

    return isinstance(module, TensorQuantizer)


def owned_quantizers(module: nn.Module) -> dict:
    """``{attribute: quantizer}`` for the quantizers ``module`` holds directly."""
    return {k: m for k, m in module._modules.items() if m is not None and is_quantizer(m)}


def layer_table(model: nn.Module) -> dict:
    """``{name: module}`` of every layer with at least one enabled quantizer, in module order."""
    table = {}
    for name, module in model.named_modules():
        if is_quantizer(module):
            continue
        owned = owned_quantizers(module)
        if owned and any(quantizer_enabled(q) for q in owned.values()):
            table[name] = module
    return table


def list_layers(model: nn.Module) -> list:
    """Names of the quantized layers of ``model`` (modules owning an enabled quantizer), in module order."""
    return list(layer_table(model))


def resolve_layers(model: nn.Module, names) -> dict:
    """``{name: module}`` of the named layers, checked against :func:`layer_table`.

    Args:
        model (nn.Module): a quantized model.
        names (str | Iterable[str] | None): layer names from :func:`list_layers`. None means all layers.

    Returns:
        dict: ``{name: module}``, in the order of ``names`` (module order for all layers).

    Raises:
        TrtQatError: when a name is not a quantized layer of ``model``.
    """
    table = layer_table(model)
    if names is None:
        return table
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise TrtQatError(f"{unknown[:3]} {'is' if len(unknown) == 1 else 'are'} not quantized layers of this model; "
                          f"choose among list_layers(model) (e.g. {list(table)[:3]})")
    return {n: table[n] for n in names}


def set_layers_float(model: nn.Module, names=None):
    """Put the named layers in float by swapping their quantizers for ``nn.Identity`` on those modules only.

    Args:
        model (nn.Module): a quantized model.
        names (Iterable[str] | None): layer names from :func:`list_layers`. Defaults to all layers.

    Returns:
        Callable[[], None]: a function that puts the original quantizer objects back.
    """
    saved = []
    for module in resolve_layers(model, names).values():
        for attr, q in owned_quantizers(module).items():
            saved.append((module, attr, q))
            setattr(module, attr, nn.Identity())

    def restore():
        for module, attr, q in reversed(saved):
            setattr(module, attr, q)
        saved.clear()

    return restore


@contextlib.contextmanager
def layers_in_float(model: nn.Module, names=None):
    """Context manager: the named layers (default all) run in float inside the block, quantized again after it.

    Quantizers shared with layers outside ``names`` keep quantizing those layers; no quantizer is modified.
    """
    restore = set_layers_float(model, names)
    try:
        yield model
    finally:
        restore()


def make_float_permanent(model: nn.Module, names) -> None:
    """Leave the named layers in float for good: each gets a *disabled copy* of its quantizers, so that the
    state-dict keys stay the same (save/load still match) and shared quantizers stay enabled for other layers."""
    for module in resolve_layers(model, names).values():
        for attr, q in owned_quantizers(module).items():
            clone = copy.deepcopy(q)
            clone.disable()
            setattr(module, attr, clone)
