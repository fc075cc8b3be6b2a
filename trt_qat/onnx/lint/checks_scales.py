"""Checks of the scales where quantized tensors meet: Concat, residual Add, MaxPool / Resize(nearest), a tensor
quantized by several Q nodes, and DQ -> Q requantize chains. Each mismatch predicts a requantize or reformat
layer in the TensorRT engine.

Each check takes the :class:`~trt_qat.onnx.lint.core.LintContext` and adds its findings to it.
"""
from __future__ import annotations

from trt_qat.onnx.lint.graph import ScaleKey, distinct_scales
from trt_qat.onnx.lint.walks import SCALE_SHARING_OPS, WEIGHTED_OPS

__all__ = ["check_concat", "check_add", "check_commuting", "check_multi_scale_tensors", "check_requantize_chains"]


def check_concat(ctx, node):
    """All inputs and the consumer Q of a Concat should share one scale."""
    g = ctx.g
    keys = []
    for t in node.inputs:
        if t.name and not g.is_const(t):
            keys += g.tensor_scales(t)
    keys += g.tensor_scales(node.outputs[0])
    reps = distinct_scales(keys)
    if len(reps) > 1:
        detail = ", ".join(f"{g.name(k.node)}={k.text()}" for k in reps[:4])
        ctx.add("warning", "concat-scale-mismatch", node,
                f"{len(reps)} different scales among the Q/DQ of the Concat's inputs and output ({detail}); "
                "TensorRT must requantize instead of writing the inputs straight into the concatenated "
                "buffer", "share one quantizer (one scale) across all inputs of the Concat and its consumer Q")


def check_add(ctx, node):
    """A quantized residual Add needs one scale on both inputs; an Add with no quantized input cannot fuse into
    the conv epilogue in INT8."""
    g = ctx.g
    inputs = [t for t in node.inputs if t.name]
    if len(inputs) != 2 or any(g.is_const(t) for t in inputs):
        return
    dqs = [g.dq_producer(t) for t in inputs]
    out_qs, _ = g.q_consumers(node.outputs[0])
    if all(d is not None for d in dqs):
        reps = distinct_scales([ScaleKey(g, d) for d in dqs])
        if len(reps) > 1 and out_qs:
            detail = ", ".join(f"{g.name(k.node)}={k.text()}" for k in reps)
            ctx.add("warning", "add-scale-mismatch", node,
                    f"the Add's inputs are dequantized with different scales ({detail}) and its output is "
                    "re-quantized: TensorRT must requantize one input",
                    "share one quantizer between the two Add inputs (QuantAdd with a shared scale)")
        return
    if any(d is not None for d in dqs):
        return
    if any(g.from_weighted(t) for t in inputs):
        ctx.add("warning", "add-not-fused", node,
                "residual Add with no quantized input: TensorRT cannot fuse it into the conv epilogue in "
                "INT8, so the conv writes float and the Add runs in float",
                "quantize the skip (residual) input with a Q/DQ pair (e.g. QuantAdd) so the Add fuses into "
                "the conv")


def check_commuting(ctx, node):
    """MaxPool / Resize(nearest): one scale on both sides, and no side read both quantized and in float."""
    g = ctx.g
    if not node.inputs or not node.outputs or not g.nearest(node):
        return
    in_keys = g.tensor_scales(node.inputs[0])
    out_keys = []
    for out in node.outputs:
        if out.name:
            out_keys += g.tensor_scales(out)
    reps = distinct_scales(in_keys + out_keys)
    if len(reps) > 1:
        detail = ", ".join(f"{g.name(k.node)}={k.text()}" for k in reps[:4])
        ctx.add("warning", "commuting-scale-mismatch", node,
                f"input and output of {node.op} are quantized with different scales ({detail}); "
                "TensorRT can only run it in INT8 between equal scales, so it inserts a requantize",
                f"give the {node.op}'s output Q the same quantizer as its input")
        return
    # A DQ on the input moves forward through the op and a Q on the output moves backward, so one quantized
    # side is normally fine. A reformat is needed when the input tensor is quantized only for *other*
    # consumers (sibling Q, no DQ) while this op reads it in float, or when the output is re-quantized and
    # also read in float.
    in_dq = g.dq_producer(node.inputs[0]) is not None
    out_qs, out_float = [], []
    for out in node.outputs:
        if out.name:
            qs, others = g.q_consumers(out)
            out_qs += qs
            out_float += [c for c in others if c is None or c.op not in WEIGHTED_OPS]
    if in_keys and not in_dq and not out_keys:
        ctx.add("warning", "commuting-partial", node,
                f"{node.op}'s input is quantized for other consumers but this op reads it in float and "
                "its output is not quantized: the producer must write both INT8 and float (a reformat)",
                f"quantize the {node.op}'s output with the same quantizer as its input, or leave the "
                "input unquantized")
    elif out_qs and out_float and not in_dq:
        ctx.add("warning", "commuting-partial", node,
                f"{node.op}'s output is both re-quantized and read in float: TensorRT keeps a float copy "
                "and adds a reformat", "quantize every consumer of the output with one shared quantizer")


def check_multi_scale_tensors(ctx):
    """One float tensor quantized by several Q nodes with different scales (e.g. a feature map read by two
    convs whose input quantizers were calibrated apart): its producer cannot write one INT8 output."""
    g = ctx.g
    covered = {"Concat"} | SCALE_SHARING_OPS
    for tensor in g.consumed_tensors():
        if g.is_const(tensor):
            continue
        consumers = g.consumers(tensor)
        direct_q = [c for c in consumers if c.op == "QuantizeLinear" and c.inputs[0].name == tensor.name]
        if not direct_q:
            continue
        producer = g.producer(tensor)
        if (producer is not None and producer.op in covered) or any(c.op in covered for c in consumers):
            continue  # reported by the Concat / MaxPool / Resize checks
        qs, _ = g.q_consumers(tensor)
        reps = distinct_scales([ScaleKey(g, q) for q in qs])
        if len(reps) < 2:
            continue
        where = producer if producer is not None else direct_q[0]
        detail = ", ".join(f"{g.name(k.node)}={k.text()}" for k in reps[:4])
        ctx.add("warning", "multi-scale-tensor", where,
                f"output '{tensor.name}' is quantized by {len(reps)} Q nodes with different scales ({detail}); "
                "the producer cannot write a single INT8 tensor, so TensorRT adds requantize layers",
                "share one quantizer among all consumers of this tensor (identical scales)")


def check_requantize_chains(ctx):
    """DQ -> Q with a different scale (a requantize) or the same one (a no-op round trip)."""
    g = ctx.g
    for node in g.nodes:
        if node.op != "DequantizeLinear":
            continue
        qs, _ = g.q_consumers(node.outputs[0])
        mine = ScaleKey(g, node)
        if not mine.known():
            continue
        for q in qs:
            other = ScaleKey(g, q)
            if not other.known():
                continue
            if mine.same(other):
                ctx.add("info", "redundant-dq-q", node,
                        f"DQ feeds Q {g.name(q)} with the same scale: a no-op round trip", "")
            else:
                ctx.add("warning", "requantize-chain", node,
                        f"Q -> DQ -> Q chain: this DQ (scale {mine.text()}) feeds Q {g.name(q)} with scale "
                        f"{other.text()}; TensorRT inserts a requantize",
                        "use one quantizer for both, or remove the second Q/DQ pair")
