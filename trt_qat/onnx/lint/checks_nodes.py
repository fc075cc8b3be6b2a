"""Checks of the model and of each Q/DQ node on its own: opset, unsupported quantized ops, scales, zero-points,
and Q / DQ nodes that are dangling, dead or paired with a different scale.

Each check takes the :class:`~trt_qat.onnx.lint.core.LintContext` and adds its findings and statistics to it.
"""
from __future__ import annotations

import numpy as np

from trt_qat.onnx.io import QDQ_OPS
from trt_qat.onnx.lint.graph import ScaleKey
from trt_qat.onnx.lint.report import Finding
from trt_qat.onnx.lint.walks import PASS_THROUGH_OPS

__all__ = ["check_opset", "check_qdq_nodes", "UNSUPPORTED_QUANT_OPS"]

UNSUPPORTED_QUANT_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}


def check_opset(ctx):
    """Opset >= 13 (per-channel Q/DQ) and no integer-arithmetic ops TensorRT cannot run."""
    # Not trt_qat.onnx.io.onnx_opset: it answers 0 both for "none declared" and for a declared opset 0, which
    # must be reported; and the last default-domain entry counts, as the linter always read it.
    opset = None
    for imp in ctx.model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    ctx.stats["opset"] = opset
    if opset is not None and opset < 13:
        ctx.findings.append(Finding(
            "error", "opset-too-low", "<model>",
            f"default-domain opset is {opset}; per-channel Q/DQ (the 'axis' attribute) needs opset >= 13",
            "re-export with torch.onnx.export(..., opset_version=13) or newer", "model"))
    for node in ctx.g.nodes:
        if node.op in UNSUPPORTED_QUANT_OPS:
            ctx.add("error", "unsupported-quant-op", node,
                    f"{node.op} is not supported by TensorRT",
                    "express quantization with QuantizeLinear/DequantizeLinear around a float op "
                    "(e.g. DQ -> Conv) instead")


def check_qdq_nodes(ctx):
    """Every Q and DQ node: its scale and zero-point, and what it is connected to. Counts them in the stats."""
    n_q = n_dq = 0
    for node in ctx.g.nodes:
        if node.op not in QDQ_OPS:
            continue
        is_q = node.op == "QuantizeLinear"
        n_q += is_q
        n_dq += not is_q
        _check_scale_and_zero_point(ctx, node)
        if is_q:
            _check_q(ctx, node)
        else:
            _check_dq(ctx, node)
    ctx.stats["quantize_nodes"] = n_q
    ctx.stats["dequantize_nodes"] = n_dq
    if n_q + n_dq == 0:
        ctx.findings.append(Finding(
            "warning", "no-qdq", "<model>", "the model has no QuantizeLinear/DequantizeLinear nodes: "
            "TensorRT builds it in float (or needs implicit PTQ calibration)",
            "export after quantize()/calibrate() with TensorQuantizer.use_fb_fake_quant=True", "model"))


def _check_scale_and_zero_point(ctx, node):
    from onnx import TensorProto

    g = ctx.g
    scale = g.const(node.inputs[1]) if len(node.inputs) > 1 else None
    if scale is None:
        ctx.add("warning", "scale-not-constant", node,
                "the scale is computed at run time, not a constant; TensorRT needs constant scales",
                "fold constants (polygraphy surgeon sanitize --fold-constants) or export calibrated amax")
    else:
        scale = np.asarray(scale, dtype=np.float64)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            ctx.add("error", "invalid-scale", node, "scale has zero, negative or non-finite values",
                    "recalibrate: an amax of 0 or NaN (a quantizer that saw no data) produced this scale")
        if scale.ndim == 1 and scale.size == 1 and "axis" not in node.attrs:
            ctx.add("warning", "per-tensor-scale-shape", node,
                    "per-tensor scale is a 1-element 1-D tensor, which ONNX reads as per-axis on axis 1; "
                    "TensorRT expects a scalar",
                    "export a 0-d scale (trt_qat's quantizers do) or reshape the initializer to a scalar")
    zp_tensor = node.inputs[2] if len(node.inputs) > 2 else None
    if zp_tensor is None or not zp_tensor.name:
        if node.op == "QuantizeLinear":
            ctx.add("warning", "zero-point-uint8", node,
                    "no zero-point input, so the quantized type defaults to uint8; TensorRT needs int8",
                    "export with an int8 zero-point of 0 (pytorch-quantization does this with "
                    "use_fb_fake_quant=True)")
        return
    zp = g.const(zp_tensor)
    dtype = g.elem_type(zp_tensor)
    if zp is not None:
        if np.any(np.asarray(zp) != 0):
            ctx.add("error", "nonzero-zero-point", node,
                    f"zero-point is not 0 (max |zp| = {int(np.max(np.abs(np.asarray(zp, dtype=np.int64))))}); "
                    "TensorRT supports only symmetric quantization",
                    "use symmetric quantizers (narrow_range int8, zero-point 0) and re-export")
        dtype = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8}.get(
            np.asarray(zp).dtype, dtype)
    if dtype == TensorProto.UINT8:
        ctx.add("warning", "zero-point-uint8", node, "zero-point dtype is uint8; TensorRT needs int8",
                "export signed int8 quantization (zero-point int8 0)")
    elif dtype is not None and dtype != TensorProto.INT8:
        ctx.add("info", "zero-point-dtype", node,
                f"zero-point dtype is {TensorProto.DataType.Name(dtype)}, not int8",
                "INT8 engines need int8 zero-points; other types need a TensorRT version that supports them")


def _check_q(ctx, node):
    g = ctx.g
    out = node.outputs[0]
    consumers = g.consumers(out)
    if not consumers and out.name not in g.graph_outputs:
        ctx.add("warning", "dead-q", node, "Q output is not used", "remove the node")
        return
    if out.name in g.graph_outputs:
        ctx.add("info", "q-graph-output", node, "the graph outputs a quantized tensor", "")
    non_dq = [c for c in consumers if c.op != "DequantizeLinear"]
    if non_dq:
        names = ", ".join(f"{g.name(c)} ({c.op})" for c in non_dq[:3])
        ctx.add("error", "dangling-q", node, f"Q output feeds {names} instead of a DequantizeLinear",
                "pair every QuantizeLinear with a DequantizeLinear (Q -> DQ -> op)")
    mine = ScaleKey(g, node)
    for dq in consumers:
        if dq.op == "DequantizeLinear" and mine.known():
            other = ScaleKey(g, dq)
            if other.known() and not mine.same(other):
                ctx.add("warning", "qdq-pair-mismatch", node,
                        f"Q scale {mine.text()} differs from its DQ {g.name(dq)} scale {other.text()}",
                        "export the Q/DQ pair from one quantizer so both use the same scale")


def _check_dq(ctx, node):
    from onnx import TensorProto

    g = ctx.g
    src = node.inputs[0]
    out = node.outputs[0]
    if not g.consumers(out) and out.name not in g.graph_outputs:
        ctx.add("warning", "dead-dq", node, "DQ output is not used", "remove the node")
    prod = g.producer(src)
    t = src
    hops = 0
    while prod is not None and prod.op in PASS_THROUGH_OPS and hops < 8:
        t = prod.inputs[0]
        prod = g.producer(t)
        hops += 1
    if prod is not None and prod.op == "QuantizeLinear":
        return
    if g.is_const(t) or t.name in g.graph_inputs:
        dtype = g.elem_type(t)
        value = g.const(t)
        if value is not None:
            dtype = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
                     np.dtype(np.int32): TensorProto.INT32}.get(value.dtype, dtype)
        if dtype in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32):
            return
    ctx.add("error", "dangling-dq", node,
            f"DQ input '{src.name}' is neither the output of a QuantizeLinear nor an integer constant",
            "feed the DQ from a QuantizeLinear (Q -> DQ) or an int8 weight initializer")
