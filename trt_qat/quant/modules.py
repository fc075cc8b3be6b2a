"""Which torch layers trt_qat swaps for which pytorch-quantization layers, and back.

:func:`quant_map` and :func:`pool_map` give the swap :func:`trt_qat.quant.instrument.quantize` makes;
:func:`to_float` undoes it for one module (the placement rules restore layers that do not run in eval).
"""
from __future__ import annotations

from torch import nn

from trt_qat.quant.quantizer import quant_nn

__all__ = ["quant_map", "pool_map", "swap", "to_float"]


def quant_map() -> dict:
    """``{float class: (quantized class, weight quantizer axis)}`` for convs, transposed convs and linears."""
    qnn = quant_nn()
    return {
        nn.Conv1d: (qnn.QuantConv1d, 0),
        nn.Conv2d: (qnn.QuantConv2d, 0),
        nn.Conv3d: (qnn.QuantConv3d, 0),
        nn.ConvTranspose1d: (qnn.QuantConvTranspose1d, 1),
        nn.ConvTranspose2d: (qnn.QuantConvTranspose2d, 1),
        nn.ConvTranspose3d: (qnn.QuantConvTranspose3d, 1),
        nn.Linear: (qnn.QuantLinear, 0),
    }


def pool_map() -> dict:
    """``{float class: quantized class}`` for the pooling layers."""
    qnn = quant_nn()
    return {
        nn.MaxPool1d: qnn.QuantMaxPool1d,
        nn.MaxPool2d: qnn.QuantMaxPool2d,
        nn.MaxPool3d: qnn.QuantMaxPool3d,
        nn.AvgPool1d: qnn.QuantAvgPool1d,
        nn.AvgPool2d: qnn.QuantAvgPool2d,
        nn.AvgPool3d: qnn.QuantAvgPool3d,
        nn.AdaptiveAvgPool1d: qnn.QuantAdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d: qnn.QuantAdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d: qnn.QuantAdaptiveAvgPool3d,
    }


def swap(module: nn.Module, cls) -> nn.Module:
    """An instance of ``cls`` sharing ``module``'s parameters and attributes (no copy)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    # fresh containers so that modules added to ``new`` don't leak into the original module (and back)
    new._modules = dict(module._modules)
    return new


def to_float(module: nn.Module) -> nn.Module | None:
    """The float layer a quantized layer was made from (same parameters, quantizers dropped), or None when
    ``module`` is not one of the layers :func:`quant_map` / :func:`pool_map` produce."""
    back = {q: f for f, (q, _) in quant_map().items()}
    back.update({q: f for f, q in pool_map().items()})
    cls = back.get(type(module))
    if cls is None:
        return None
    new = swap(module, cls)
    for key in ("_input_quantizer", "_weight_quantizer"):
        new._modules.pop(key, None)
    return new
