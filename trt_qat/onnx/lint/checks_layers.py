"""Checks of the weighted layers (Conv, ConvTranspose, Gemm, MatMul): which run in INT8, which stay in float and
why, their weight quantization axis, and the INT8 coverage of their multiply-accumulates.

Each check takes the :class:`~trt_qat.onnx.lint.core.LintContext` and adds its findings and statistics to it.
"""
from __future__ import annotations

import numpy as np

from trt_qat.onnx.lint.walks import WEIGHTED_OPS

__all__ = ["check_weighted", "layer_macs"]


def check_weighted(ctx):
    """Every weighted op: INT8-eligible (activation and weight both arrive through DQ) or why not, and the
    coverage statistics (``int8_coverage``, ``float_layers``, ...)."""
    g = ctx.g
    total = int8 = skipped_float = 0
    unknown = []
    float_layers = []
    n_layers = n_int8 = 0
    for node in g.nodes:
        if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
            continue
        n_layers += 1
        act, wt = node.inputs[0], node.inputs[1]
        wt_is_const = g.weight_is_const(wt)
        act_q = g.act_quantized(act)
        wt_q = g.weight_quantized(wt) if wt_is_const else g.act_quantized(wt)
        macs = layer_macs(g, node)
        if macs is None:
            unknown.append(g.name(node))
            macs = 0
        total += macs
        skipped = ctx.is_skipped(node)
        wt_word = "weight" if wt_is_const else "second input"
        if act_q and wt_q:
            n_int8 += 1
            int8 += macs
            ctx.add("info", "int8-eligible", node,
                    f"activation and {wt_word} arrive through DequantizeLinear ({macs:,} MACs)", "")
            if wt_is_const:
                _check_weight_axis(ctx, node, wt)
            continue
        reasons = []
        if not act_q:
            reasons.append("activation not quantized")
        if not wt_q:
            reasons.append(f"{wt_word} not quantized")
        reason = ", ".join(reasons)
        declared = ctx.declared_reason(node) if skipped else None
        float_layers.append({"node": g.name(node), "op": node.op, "macs": macs, "reason": reason,
                             "skipped": skipped, **({"why": declared} if declared else {})})
        if skipped:
            skipped_float += macs
            ctx.add("info", "float-by-choice", node, f"left in float on purpose ({declared or reason}, {macs:,} MACs)",
                    "")
            continue
        fix = []
        if not act_q:
            fix.append("put a Q/DQ pair (an input quantizer) on the activation input")
        if not wt_q:
            fix.append(f"quantize the {wt_word} (per-channel Q/DQ)" if wt_is_const else
                       "put a Q/DQ pair on the second input")
        ctx.add("warning", "not-int8", node, f"runs in float: {reason} ({macs:,} MACs)",
                "; ".join(fix) + ", or list the layer in --skip if float is intended")
    ctx.stats.update({
        "weighted_layers": n_layers,
        "int8_layers": n_int8,
        "total_macs": total,
        "int8_macs": int8,
        "int8_coverage": (int8 / total) if total else None,
        "skipped_float_layers": sum(1 for f in float_layers if f["skipped"]),
        "skipped_float_macs": skipped_float,
        "int8_coverage_excluding_skipped": (int8 / (total - skipped_float)) if total - skipped_float else None,
        "float_layers": float_layers,
        "layers_with_unknown_macs": unknown,
    })


def _check_weight_axis(ctx, node, wt):
    g = ctx.g
    dq = g.producer(wt)
    if dq is None or dq.op != "DequantizeLinear":
        return  # through Transpose/Reshape: the axis refers to another layout; do not guess
    scale = g.const(dq.inputs[1])
    if scale is None:
        return
    if np.asarray(scale).size == 1:
        ctx.add("info", "per-tensor-weight", node,
                f"weight scale is per-tensor (DQ {g.name(dq)})",
                "per-channel weight scales (axis 0 for Conv/Gemm, 1 for ConvTranspose) usually keep more "
                "accuracy")
        return
    shape = g.shape(dq.inputs[0]) or g.shape(wt)
    rank = len(shape) if shape else None
    axis = int(g.attr(dq, "axis", 1))
    if axis < 0 and rank:
        axis += rank
    if node.op == "Conv":
        expected = 0
    elif node.op == "ConvTranspose":
        expected = 1
    elif node.op == "Gemm":
        expected = 0 if g.attr(node, "transB", 0) else 1
    else:  # MatMul: weight is [..., K, N]
        expected = rank - 1 if rank else None
    if expected is None or axis == expected:
        return
    ctx.add("error", "wrong-weight-axis", node,
            f"weight DQ {g.name(dq)} is per-channel along axis {axis}, but {node.op} weights must be "
            f"quantized along axis {expected} (output channels)",
            f"quantize the weight per output channel: axis {expected}"
            + (" (pytorch-quantization: QuantDescriptor(axis=(1,)) for QuantConvTranspose weights)"
               if node.op == "ConvTranspose" else ""))


def layer_macs(g, node):
    """Multiply-accumulates of one weighted node at batch 1, or None when a shape it needs is unknown.

    Args:
        g (trt_qat.onnx.lint.walks.QdqGraph): the graph.
        node (onnx_graphsurgeon.Node): a Conv, ConvTranspose, Gemm or MatMul node.
    """
    w_shape = g.shape(node.inputs[1])
    if node.op in ("Conv", "ConvTranspose"):
        if not w_shape:
            return None
        spatial_src = node.outputs[0] if node.op == "Conv" else node.inputs[0]
        s = g.shape(spatial_src)
        if not s or len(s) < 2:
            return None
        return int(np.prod(s[2:], dtype=np.int64) * np.prod(w_shape, dtype=np.int64))
    out = g.shape(node.outputs[0])
    a = g.shape(node.inputs[0])
    if not out or not a:
        return None
    if node.op == "Gemm":
        k = a[0] if g.attr(node, "transA", 0) else a[-1]
    else:
        k = a[-1]
    return int(np.prod(out, dtype=np.int64) * k)
