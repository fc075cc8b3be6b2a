"""2:4 structured sparsity of Conv weights, as TensorRT's sparse tensor cores need it: for each output channel and
kernel position, every group of 4 consecutive input channels holds at most 2 non-zeros. Checked on the weights
TensorRT sees: a constant, or a constant through QuantizeLinear (rounded by its scale: a weight that quantizes to
0 counts as 0) and DequantizeLinear.

TensorRT chooses sparse kernels only for large layers (about 256 channels or more, NVIDIA/TensorRT #4065), so a
layer is *2:4-ready* when it holds the pattern and has at least ``min_channels`` input and output channels
(groups 1, input channels a multiple of 4). The statistics give the fraction of conv MACs that are 2:4-ready.
"""
from __future__ import annotations

import numpy as np

from trt_qat.onnx.lint.checks_layers import layer_macs

__all__ = ["DEFAULT_MIN_CHANNELS", "check_sparsity", "weights_hold_2_4", "conv_weight_values"]

DEFAULT_MIN_CHANNELS = 256


def weights_hold_2_4(w) -> bool:
    """Whether conv weight array ``w`` (``[out, in, k...]``) holds 2:4 along its input channels."""
    w = np.asarray(w)
    if w.ndim < 2 or w.shape[1] % 4 or w.shape[1] == 0:
        return False
    moved = np.moveaxis(w, 1, -1)
    groups = moved.reshape(*moved.shape[:-1], w.shape[1] // 4, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def _quantized(g, q, value):
    scale = g.const(q.inputs[1]) if len(q.inputs) > 1 else None
    if scale is None:
        return value
    scale = np.asarray(scale, dtype=np.float64)
    if scale.size > 1:
        axis = int(g.attr(q, "axis", 1))
        shape = [1] * value.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, np.round(value / np.where(scale > 0, scale, 1.0)), value)


def conv_weight_values(g, node):
    """The weight values of Conv ``node`` as TensorRT sees them (quantized integers behind a Q/DQ pair), or None."""
    tensor = node.inputs[1]
    for _ in range(4):
        value = g.const(tensor)
        if value is not None:
            return np.asarray(value)
        prod = g.producer(tensor)
        if prod is None or prod.op not in ("DequantizeLinear", "QuantizeLinear", "Identity"):
            return None
        src = g.const(prod.inputs[0])
        if prod.op == "QuantizeLinear" and src is not None:
            return _quantized(g, prod, np.asarray(src, dtype=np.float64))
        tensor = prod.inputs[0]
    return None


def check_sparsity(ctx, min_channels: int = DEFAULT_MIN_CHANNELS):
    """Per Conv: whether its weights hold 2:4 and whether it is large enough for sparse kernels; the statistics
    ``stats["sparsity"]`` with the fraction of conv MACs that are 2:4-ready. A conv that holds the pattern but is
    too small gets an info finding (the sparsity buys nothing there)."""
    g = ctx.g
    layers, total, eligible_macs, ready_macs = [], 0, 0, 0
    for node in g.nodes:
        if node.op != "Conv" or len(node.inputs) < 2:
            continue
        w = conv_weight_values(g, node)
        shape = list(w.shape) if w is not None else g.shape(node.inputs[1])
        macs = layer_macs(g, node) or 0
        total += macs
        groups = int(g.attr(node, "group", 1))
        c_out, c_in = (shape[0], shape[1] * groups) if shape and len(shape) >= 2 else (0, 0)
        large = groups == 1 and c_in % 4 == 0 and min(c_in, c_out) >= int(min_channels)
        holds = bool(w is not None and groups == 1 and weights_hold_2_4(w))
        eligible_macs += macs if large else 0
        ready_macs += macs if large and holds else 0
        layers.append({"node": g.name(node), "in_channels": c_in, "out_channels": c_out, "groups": groups,
                       "macs": macs, "holds_2_4": holds, "large_enough": large, "weights_known": w is not None})
        if holds and not large:
            ctx.add("info", "sparse-too-small", node,
                    f"weights hold 2:4 but the layer ({c_in} in / {c_out} out channels) is below {min_channels}: "
                    "TensorRT runs it densely", "")
    ctx.stats["sparsity"] = {
        "min_channels": int(min_channels), "convs": len(layers),
        "holding_2_4": sum(1 for la in layers if la["holds_2_4"]),
        "large_enough": sum(1 for la in layers if la["large_enough"]),
        "ready": sum(1 for la in layers if la["holds_2_4"] and la["large_enough"]),
        "conv_macs": total, "eligible_macs": eligible_macs, "ready_macs": ready_macs,
        "ready_fraction": ready_macs / total if total else None,
        "ready_fraction_of_eligible": ready_macs / eligible_macs if eligible_macs else None,
        "layers": layers,
    }
