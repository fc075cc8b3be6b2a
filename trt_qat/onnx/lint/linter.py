"""Q/DQ placement linter for any ONNX model (ours, NVIDIA ModelOpt's, ``yolov7_qat``'s).

The linter is a pure graph walk over the ONNX protobuf plus ONNX shape inference. It needs no model-specific
configuration and predicts, from the placement of QuantizeLinear (Q) and DequantizeLinear (DQ) nodes, where
TensorRT's explicit-quantization builder will run INT8 and where it has to insert requantize or reformat layers.

Checks, following TensorRT's Q/DQ placement recommendations:

- every Conv / ConvTranspose / Gemm / MatMul: INT8-eligible (activation and weight both arrive through DQ,
  possibly through commuting ops such as Reshape, Transpose or MaxPool) or why not;
- scale mismatches (compared by value) around Concat, Add, MaxPool, Resize(nearest) and other commuting ops;
- DQ -> Q requantize chains with different scales;
- dangling or dead Q / DQ nodes;
- non-zero or uint8 zero-points, per-tensor weight scales, a wrong weight axis, an opset below 13;
- predicted INT8 coverage of the weighted ops' multiply-accumulates and the predicted number of
  requantize/reformat sites.

CLI: ``trt-qat lint model.onnx [--json out.json] [--strict] [--skip REGEX ...]`` or
``python -m trt_qat.lint``.
"""
from __future__ import annotations

import dataclasses
import re
import textwrap

import numpy as np

from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import require_file

__all__ = ["Finding", "LintReport", "lint_onnx"]

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that only move or reshape data: a DQ commutes through them and they need no scale of their own.
PASS_THROUGH_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                    "Pad", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"}
# Ops that commute with quantization but that TensorRT runs in INT8 only when both sides share one scale.
SCALE_SHARING_OPS = {"MaxPool", "GlobalMaxPool", "Resize", "Upsample"}
# Pointwise ops TensorRT fuses into a weighted op's epilogue (used to find the conv branch of a residual Add).
EPILOGUE_OPS = {"Relu", "LeakyRelu", "Sigmoid", "Mul", "Clip", "HardSwish", "HardSigmoid", "BatchNormalization",
                "Tanh", "PRelu", "Elu", "Selu", "Softplus", "Mish", "Gelu"}
UNSUPPORTED_QUANT_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}
# The finding codes that predict a requantize or reformat layer in the engine.
MISMATCH_CODES = {"concat-scale-mismatch", "add-scale-mismatch", "commuting-scale-mismatch", "multi-scale-tensor"}
REFORMAT_CODES = MISMATCH_CODES | {"requantize-chain", "commuting-partial", "add-not-fused"}
SEVERITIES = ("error", "warning", "info")
_RTOL = 1e-6


@dataclasses.dataclass
class Finding:
    """One observation about one node.

    Args:
        severity (str): ``"error"`` (TensorRT rejects or mis-computes it), ``"warning"`` (costs speed or
            INT8 coverage) or ``"info"``.
        code (str): a stable short identifier, e.g. ``"concat-scale-mismatch"``.
        node (str): the node's name (``"<op>#<index>"`` when the ONNX node has no name).
        message (str): what is wrong.
        fix (str): how to fix it. Empty for purely informative findings.
        op (str): the node's op type. Defaults to "".
    """

    severity: str
    code: str
    node: str
    message: str
    fix: str = ""
    op: str = ""

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def reformat(self) -> bool:
        """True when the finding predicts a requantize or reformat layer in the TensorRT engine."""
        return self.code in REFORMAT_CODES

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reformat": self.reformat}


@dataclasses.dataclass
class LintReport:
    """The linter's result: a list of findings and a dict of statistics (coverage, counts, float layers)."""

    findings: list = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)
    model: str = ""

    @property
    def errors(self) -> list:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list:
        return [f for f in self.findings if f.severity == "warning"]

    def by_code(self, code: str) -> list:
        """All findings with the given code."""
        return [f for f in self.findings if f.code == code]

    def summary(self) -> str:
        """One line: coverage, mismatches, requantize chains, reformat sites, errors and warnings."""
        s = self.stats
        cov = s.get("int8_coverage")
        text = "coverage n/a (no weighted ops with known shapes)" if cov is None else \
            f"coverage {100 * cov:.1f}% of MACs INT8"
        if s.get("skipped_float_layers"):
            excl = s.get("int8_coverage_excluding_skipped")
            excl_txt = "n/a" if excl is None else f"{100 * excl:.1f}%"
            text += f" ({excl_txt} excluding {s['skipped_float_layers']} skipped float layers)"
        text += (f", {s.get('int8_layers', 0)}/{s.get('weighted_layers', 0)} weighted layers INT8"
                 f", {s.get('scale_mismatches', 0)} scale mismatches"
                 f", {s.get('requantize_chains', 0)} requantize chains"
                 f", {s.get('reformat_sites', 0)} predicted requantize/reformat sites"
                 f", {len(self.errors)} errors, {len(self.warnings)} warnings")
        return text

    def to_dict(self) -> dict:
        return {"model": self.model, "summary": self.summary(), "stats": self.stats,
                "findings": [f.to_dict() for f in self.findings]}

    def format_table(self, show_int8: bool = False, width: int = 48) -> str:
        """Render the findings as a text table (severity, node, op, finding, fix) followed by the summary.

        Args:
            show_int8 (bool): also list the ``int8-eligible`` rows of healthy layers. Defaults to False.
            width (int): wrap width of the finding and fix columns. Defaults to 48.
        """
        order = {sev: i for i, sev in enumerate(SEVERITIES)}
        rows = [f for f in self.findings if show_int8 or f.code != "int8-eligible"]
        rows.sort(key=lambda f: order[f.severity])
        header = ("SEVERITY", "NODE", "OP", "FINDING", "FIX")
        cells = []
        for f in rows:
            node = f.node if len(f.node) <= 60 else "..." + f.node[-57:]
            cells.append((f.severity, node, f.op, textwrap.wrap(f"[{f.code}] {f.message}", width) or [""],
                          textwrap.wrap(f.fix, width) or ["-"]))
        w_sev = max([len(header[0])] + [len(c[0]) for c in cells])
        w_node = max([len(header[1])] + [len(c[1]) for c in cells])
        w_op = max([len(header[2])] + [len(c[2]) for c in cells])
        w_msg = max([len(header[3])] + [len(line) for c in cells for line in c[3]])
        lines = [f"{header[0]:<{w_sev}}  {header[1]:<{w_node}}  {header[2]:<{w_op}}  {header[3]:<{w_msg}}  "
                 f"{header[4]}"]
        lines.append("-" * len(lines[0]))
        for sev, node, op, msg, fix in cells:
            for i in range(max(len(msg), len(fix))):
                first = i == 0
                lines.append(f"{sev if first else '':<{w_sev}}  {node if first else '':<{w_node}}  "
                             f"{op if first else '':<{w_op}}  {msg[i] if i < len(msg) else '':<{w_msg}}  "
                             f"{fix[i] if i < len(fix) else ''}".rstrip())
        if not cells:
            lines.append("(no findings)")
        float_layers = self.stats.get("float_layers") or []
        if float_layers:
            lines.append("")
            lines.append("float layers (MACs at batch 1):")
            for layer in float_layers:
                tag = " [skipped on purpose]" if layer["skipped"] else ""
                lines.append(f"  {layer['node']} ({layer['op']}): {layer['macs']:,} MACs, {layer['reason']}{tag}")
        lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)


class _Graph:
    """Producer/consumer maps, constant values and inferred shapes of one ONNX graph."""

    def __init__(self, model):
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.names = {}
        for i, node in enumerate(self.nodes):
            self.names[id(node)] = node.name or f"{node.op_type}#{i}"
        self.producer = {}
        self.consumers = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.graph_inputs = {vi.name: vi for vi in graph.input if vi.name not in self.initializers}
        self.graph_outputs = {vi.name for vi in graph.output}
        self.shapes = {}
        self.elem_types = {}
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            self._record_value_info(vi)
        for init in graph.initializer:
            self.shapes[init.name] = list(init.dims)
            self.elem_types[init.name] = init.data_type
        self._const_cache = {}

    def _record_value_info(self, vi):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            return
        self.elem_types[vi.name] = t.elem_type
        if t.HasField("shape"):
            # Symbolic or unknown dims (dynamic batch) count as 1.
            self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                                    for d in t.shape.dim]

    def add_shapes(self, inferred_model):
        g = inferred_model.graph
        for vi in list(g.value_info) + list(g.output):
            if vi.name not in self.shapes:
                self._record_value_info(vi)

    def name(self, node) -> str:
        return self.names[id(node)]

    def const(self, tensor: str):
        """The value of ``tensor`` when it is an initializer or a Constant node's output (through Identity)."""
        if not tensor:
            return None
        if tensor in self._const_cache:
            return self._const_cache[tensor]
        from onnx import numpy_helper

        value = None
        if tensor in self.initializers:
            value = numpy_helper.to_array(self.initializers[tensor])
        else:
            node = self.producer.get(tensor)
            if node is not None and node.op_type == "Constant":
                value = _constant_node_value(node)
            elif node is not None and node.op_type == "Identity":
                value = self.const(node.input[0])
        self._const_cache[tensor] = value
        return value

    def is_const(self, tensor: str) -> bool:
        return self.const(tensor) is not None

    def attr(self, node, name, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _constant_node_value(node):
    from onnx import helper, numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a))
    return None


class _ScaleKey:
    """A Q/DQ scale compared by value (rtol 1e-6), or by tensor name when it is not a constant."""

    def __init__(self, graph: _Graph, node):
        self.node = node
        self.tensor = node.input[1] if len(node.input) > 1 else ""
        value = graph.const(self.tensor)
        self.value = None if value is None else np.asarray(value, dtype=np.float64).reshape(-1)

    def same(self, other: "_ScaleKey") -> bool:
        if self.value is None or other.value is None:
            return self.tensor == other.tensor
        if self.value.shape != other.value.shape:
            return False
        return bool(np.allclose(self.value, other.value, rtol=_RTOL, atol=0.0))

    def known(self) -> bool:
        return self.value is not None

    def text(self) -> str:
        if self.value is None:
            return f"<{self.tensor}>"
        if self.value.size == 1:
            return f"{self.value[0]:.6g}"
        return f"[{self.value.size} channels]"


def _distinct(keys):
    """Group scale keys by value; returns one representative per distinct value (unknown values ignored)."""
    reps = []
    for key in keys:
        if not key.known():
            continue
        if not any(key.same(r) for r in reps):
            reps.append(key)
    return reps


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<ModelProto>"
    path = require_file(model_or_path, "ONNX model", "pass the path of an exported .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, external-data errors, ...
        raise TrtQatError(f"cannot read ONNX model '{path}' ({type(exc).__name__}: {str(exc)[:200]}); "
                          "check that the file is a complete ONNX export (re-export it if it was truncated)") from None
    if not model.graph.node:
        raise TrtQatError(f"ONNX model '{path}' has no graph nodes; check that the file is an ONNX model "
                          "and not a checkpoint or an engine")
    return model, str(path)


class _Linter:
    def __init__(self, model, skip_nodes):
        self.g = _Graph(model)
        self.model = model
        self.skip = [re.compile(p) for p in (skip_nodes or [])]
        self.findings = []
        self.stats = {}
        self._act_memo = {}

    # ----------------------------------------------------------------- helpers
    def add(self, severity, code, node, message, fix=""):
        self.findings.append(Finding(severity, code, self.g.name(node), message, fix, node.op_type))

    def is_skipped(self, node) -> bool:
        name = self.g.name(node)
        return any(p.search(name) for p in self.skip)

    def commutes(self, node) -> bool:
        if node.op_type in PASS_THROUGH_OPS:
            return True
        if node.op_type in SCALE_SHARING_OPS:
            return self.nearest(node)
        return False

    def nearest(self, node) -> bool:
        if node.op_type in ("Resize", "Upsample"):
            mode = self.g.attr(node, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            return mode == "nearest"
        return True

    def dq_producer(self, tensor, through=PASS_THROUGH_OPS):
        """The DQ node producing ``tensor``, looking upstream through data-movement ops; else None."""
        seen = 0
        while tensor and seen < 32:
            node = self.g.producer.get(tensor)
            if node is None:
                return None
            if node.op_type == "DequantizeLinear":
                return node
            if node.op_type in through:
                tensor = node.input[0]
                seen += 1
                continue
            return None
        return None

    def q_consumers(self, tensor, through=PASS_THROUGH_OPS, depth=0):
        """Q nodes consuming ``tensor`` (downstream through data-movement ops) and the other consumers."""
        qs, others = [], []
        if depth > 32:
            return qs, others
        for node in self.g.consumers.get(tensor, []):
            if node.op_type == "QuantizeLinear" and node.input[0] == tensor:
                qs.append(node)
            elif node.op_type in through and node.input[0] == tensor:
                for out in node.output:
                    sub_q, sub_o = self.q_consumers(out, through, depth + 1)
                    qs += sub_q
                    others += sub_o
                if not any(node.output):
                    others.append(node)
            else:
                others.append(node)
        if tensor in self.g.graph_outputs:
            others.append(None)
        return qs, others

    def tensor_scales(self, tensor):
        """Every scale attached to ``tensor``: its DQ producer and the Q nodes that quantize it."""
        keys = []
        dq = self.dq_producer(tensor)
        if dq is not None:
            keys.append(_ScaleKey(self.g, dq))
        qs, _ = self.q_consumers(tensor)
        keys += [_ScaleKey(self.g, q) for q in qs]
        return keys

    def act_quantized(self, tensor, depth=0) -> bool:
        """True when ``tensor`` reaches its consumer in INT8: a DQ, possibly moved forward through commuting
        ops (all inputs of a Concat must be quantized)."""
        if tensor in self._act_memo:
            return self._act_memo[tensor]
        result = False
        node = self.g.producer.get(tensor)
        if node is not None and depth < 64:
            if node.op_type == "DequantizeLinear":
                result = True
            elif self.commutes(node) and node.input:
                result = self.act_quantized(node.input[0], depth + 1)
            elif node.op_type == "Concat":
                result = all(self.act_quantized(t, depth + 1) for t in node.input if t)
        self._act_memo[tensor] = result
        return result

    def from_weighted(self, tensor) -> bool:
        """True when ``tensor`` is a weighted op's output, possibly through fusable pointwise ops."""
        for _ in range(4):
            node = self.g.producer.get(tensor)
            if node is None:
                return False
            if node.op_type in WEIGHTED_OPS:
                return True
            if node.op_type not in EPILOGUE_OPS or not node.input:
                return False
            tensor = node.input[0]
        return False

    # ----------------------------------------------------------------- checks
    def check_opset(self):
        opset = None
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                opset = imp.version
        self.stats["opset"] = opset
        if opset is not None and opset < 13:
            self.findings.append(Finding(
                "error", "opset-too-low", "<model>",
                f"default-domain opset is {opset}; per-channel Q/DQ (the 'axis' attribute) needs opset >= 13",
                "re-export with torch.onnx.export(..., opset_version=13) or newer", "model"))
        for node in self.g.nodes:
            if node.op_type in UNSUPPORTED_QUANT_OPS:
                self.add("error", "unsupported-quant-op", node,
                         f"{node.op_type} is not supported by TensorRT",
                         "express quantization with QuantizeLinear/DequantizeLinear around a float op "
                         "(e.g. DQ -> Conv) instead")

    def check_qdq_nodes(self):
        g = self.g
        n_q = n_dq = 0
        for node in g.nodes:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            is_q = node.op_type == "QuantizeLinear"
            n_q += is_q
            n_dq += not is_q
            self.check_scale_and_zero_point(node)
            if is_q:
                self.check_q(node)
            else:
                self.check_dq(node)
        self.stats["quantize_nodes"] = n_q
        self.stats["dequantize_nodes"] = n_dq
        if n_q + n_dq == 0:
            self.findings.append(Finding(
                "warning", "no-qdq", "<model>", "the model has no QuantizeLinear/DequantizeLinear nodes: "
                "TensorRT builds it in float (or needs implicit PTQ calibration)",
                "export after quantize()/calibrate() with TensorQuantizer.use_fb_fake_quant=True", "model"))

    def check_scale_and_zero_point(self, node):
        from onnx import TensorProto

        g = self.g
        scale = g.const(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            self.add("warning", "scale-not-constant", node,
                     "the scale is computed at run time, not a constant; TensorRT needs constant scales",
                     "fold constants (polygraphy surgeon sanitize --fold-constants) or export calibrated amax")
        else:
            scale = np.asarray(scale, dtype=np.float64)
            if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
                self.add("error", "invalid-scale", node, "scale has zero, negative or non-finite values",
                         "recalibrate: an amax of 0 or NaN (a quantizer that saw no data) produced this scale")
            if scale.ndim == 1 and scale.size == 1 and not any(a.name == "axis" for a in node.attribute):
                self.add("warning", "per-tensor-scale-shape", node,
                         "per-tensor scale is a 1-element 1-D tensor, which ONNX reads as per-axis on axis 1; "
                         "TensorRT expects a scalar",
                         "export a 0-d scale (trt_qat's quantizers do) or reshape the initializer to a scalar")
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if not zp_name:
            if node.op_type == "QuantizeLinear":
                self.add("warning", "zero-point-uint8", node,
                         "no zero-point input, so the quantized type defaults to uint8; TensorRT needs int8",
                         "export with an int8 zero-point of 0 (pytorch-quantization does this with "
                         "use_fb_fake_quant=True)")
            return
        zp = g.const(zp_name)
        dtype = g.elem_types.get(zp_name)
        if zp is not None:
            if np.any(np.asarray(zp) != 0):
                self.add("error", "nonzero-zero-point", node,
                         f"zero-point is not 0 (max |zp| = {int(np.max(np.abs(np.asarray(zp, dtype=np.int64))))}); "
                         "TensorRT supports only symmetric quantization",
                         "use symmetric quantizers (narrow_range int8, zero-point 0) and re-export")
            dtype = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8}.get(
                np.asarray(zp).dtype, dtype)
        if dtype == TensorProto.UINT8:
            self.add("warning", "zero-point-uint8", node, "zero-point dtype is uint8; TensorRT needs int8",
                     "export signed int8 quantization (zero-point int8 0)")
        elif dtype is not None and dtype != TensorProto.INT8:
            self.add("info", "zero-point-dtype", node,
                     f"zero-point dtype is {TensorProto.DataType.Name(dtype)}, not int8",
                     "INT8 engines need int8 zero-points; other types need a TensorRT version that supports them")

    def check_q(self, node):
        g = self.g
        out = node.output[0]
        consumers = g.consumers.get(out, [])
        if not consumers and out not in g.graph_outputs:
            self.add("warning", "dead-q", node, "Q output is not used", "remove the node")
            return
        if out in g.graph_outputs:
            self.add("info", "q-graph-output", node, "the graph outputs a quantized tensor", "")
        non_dq = [c for c in consumers if c.op_type != "DequantizeLinear"]
        if non_dq:
            names = ", ".join(f"{g.name(c)} ({c.op_type})" for c in non_dq[:3])
            self.add("error", "dangling-q", node, f"Q output feeds {names} instead of a DequantizeLinear",
                     "pair every QuantizeLinear with a DequantizeLinear (Q -> DQ -> op)")
        mine = _ScaleKey(g, node)
        for dq in consumers:
            if dq.op_type == "DequantizeLinear" and mine.known():
                other = _ScaleKey(g, dq)
                if other.known() and not mine.same(other):
                    self.add("warning", "qdq-pair-mismatch", node,
                             f"Q scale {mine.text()} differs from its DQ {g.name(dq)} scale {other.text()}",
                             "export the Q/DQ pair from one quantizer so both use the same scale")

    def check_dq(self, node):
        g = self.g
        from onnx import TensorProto

        src = node.input[0]
        out = node.output[0]
        if not g.consumers.get(out) and out not in g.graph_outputs:
            self.add("warning", "dead-dq", node, "DQ output is not used", "remove the node")
        prod = g.producer.get(src)
        t = src
        hops = 0
        while prod is not None and prod.op_type in PASS_THROUGH_OPS and hops < 8:
            t = prod.input[0]
            prod = g.producer.get(t)
            hops += 1
        if prod is not None and prod.op_type == "QuantizeLinear":
            return
        if g.is_const(t) or t in g.graph_inputs:
            dtype = g.elem_types.get(t)
            value = g.const(t)
            if value is not None:
                dtype = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
                         np.dtype(np.int32): TensorProto.INT32}.get(value.dtype, dtype)
            if dtype in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32):
                return
        self.add("error", "dangling-dq", node,
                 f"DQ input '{src}' is neither the output of a QuantizeLinear nor an integer constant",
                 "feed the DQ from a QuantizeLinear (Q -> DQ) or an int8 weight initializer")

    def check_weighted(self):
        g = self.g
        total = int8 = skipped_float = 0
        unknown = []
        float_layers = []
        n_layers = n_int8 = 0
        for node in g.nodes:
            if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
                continue
            n_layers += 1
            act, wt = node.input[0], node.input[1]
            wt_is_const = self.weight_is_const(wt)
            act_q = self.act_quantized(act)
            wt_q = self.weight_quantized(wt) if wt_is_const else self.act_quantized(wt)
            macs = self.macs(node)
            if macs is None:
                unknown.append(g.name(node))
                macs = 0
            total += macs
            skipped = self.is_skipped(node)
            wt_word = "weight" if wt_is_const else "second input"
            if act_q and wt_q:
                n_int8 += 1
                int8 += macs
                self.add("info", "int8-eligible", node,
                         f"activation and {wt_word} arrive through DequantizeLinear ({macs:,} MACs)", "")
                if wt_is_const:
                    self.check_weight_axis(node, wt)
                continue
            reasons = []
            if not act_q:
                reasons.append("activation not quantized")
            if not wt_q:
                reasons.append(f"{wt_word} not quantized")
            reason = ", ".join(reasons)
            float_layers.append({"node": g.name(node), "op": node.op_type, "macs": macs, "reason": reason,
                                 "skipped": skipped})
            if skipped:
                skipped_float += macs
                self.add("info", "float-by-choice", node, f"left in float on purpose ({reason}, {macs:,} MACs)",
                         "")
                continue
            fix = []
            if not act_q:
                fix.append("put a Q/DQ pair (an input quantizer) on the activation input")
            if not wt_q:
                fix.append(f"quantize the {wt_word} (per-channel Q/DQ)" if wt_is_const else
                           "put a Q/DQ pair on the second input")
            self.add("warning", "not-int8", node, f"runs in float: {reason} ({macs:,} MACs)",
                     "; ".join(fix) + ", or list the layer in --skip if float is intended")
        self.stats.update({
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

    def weight_is_const(self, tensor) -> bool:
        """True when ``tensor`` derives only from constants (a weight), through DQ/Q/Transpose/Reshape/..."""
        g = self.g
        for _ in range(16):
            if g.is_const(tensor):
                return True
            node = g.producer.get(tensor)
            if node is None:
                return False
            if node.op_type in ("DequantizeLinear", "QuantizeLinear", "Cast") or node.op_type in PASS_THROUGH_OPS:
                tensor = node.input[0]
                continue
            return False
        return False

    def weight_quantized(self, tensor) -> bool:
        return self.dq_producer(tensor, PASS_THROUGH_OPS | {"Cast"}) is not None

    def check_weight_axis(self, node, wt):
        g = self.g
        dq = g.producer.get(wt)
        if dq is None or dq.op_type != "DequantizeLinear":
            return  # through Transpose/Reshape: the axis refers to another layout; do not guess
        scale = g.const(dq.input[1])
        if scale is None:
            return
        if np.asarray(scale).size == 1:
            self.add("info", "per-tensor-weight", node,
                     f"weight scale is per-tensor (DQ {g.name(dq)})",
                     "per-channel weight scales (axis 0 for Conv/Gemm, 1 for ConvTranspose) usually keep more "
                     "accuracy")
            return
        shape = g.shapes.get(dq.input[0]) or g.shapes.get(wt)
        rank = len(shape) if shape else None
        axis = int(g.attr(dq, "axis", 1))
        if axis < 0 and rank:
            axis += rank
        if node.op_type == "Conv":
            expected = 0
        elif node.op_type == "ConvTranspose":
            expected = 1
        elif node.op_type == "Gemm":
            expected = 0 if g.attr(node, "transB", 0) else 1
        else:  # MatMul: weight is [..., K, N]
            expected = rank - 1 if rank else None
        if expected is None or axis == expected:
            return
        self.add("error", "wrong-weight-axis", node,
                 f"weight DQ {g.name(dq)} is per-channel along axis {axis}, but {node.op_type} weights must be "
                 f"quantized along axis {expected} (output channels)",
                 f"quantize the weight per output channel: axis {expected}"
                 + (" (pytorch-quantization: QuantDescriptor(axis=(1,)) for QuantConvTranspose weights)"
                    if node.op_type == "ConvTranspose" else ""))

    def macs(self, node):
        g = self.g
        w_shape = g.shapes.get(node.input[1])
        if node.op_type in ("Conv", "ConvTranspose"):
            if not w_shape:
                return None
            spatial_src = node.output[0] if node.op_type == "Conv" else node.input[0]
            s = g.shapes.get(spatial_src)
            if not s or len(s) < 2:
                return None
            return int(np.prod(s[2:], dtype=np.int64) * np.prod(w_shape, dtype=np.int64))
        out = g.shapes.get(node.output[0])
        a = g.shapes.get(node.input[0])
        if not out or not a:
            return None
        if node.op_type == "Gemm":
            k = a[0] if g.attr(node, "transA", 0) else a[-1]
        else:
            k = a[-1]
        return int(np.prod(out, dtype=np.int64) * k)

    def check_concat(self, node):
        g = self.g
        keys = []
        for t in node.input:
            if t and not g.is_const(t):
                keys += self.tensor_scales(t)
        keys += self.tensor_scales(node.output[0])
        reps = _distinct(keys)
        if len(reps) > 1:
            detail = ", ".join(f"{g.name(k.node)}={k.text()}" for k in reps[:4])
            self.add("warning", "concat-scale-mismatch", node,
                     f"{len(reps)} different scales among the Q/DQ of the Concat's inputs and output ({detail}); "
                     "TensorRT must requantize instead of writing the inputs straight into the concatenated "
                     "buffer", "share one quantizer (one scale) across all inputs of the Concat and its consumer Q")

    def check_add(self, node):
        g = self.g
        inputs = [t for t in node.input if t]
        if len(inputs) != 2 or any(g.is_const(t) for t in inputs):
            return
        dqs = [self.dq_producer(t) for t in inputs]
        out_qs, _ = self.q_consumers(node.output[0])
        if all(d is not None for d in dqs):
            reps = _distinct([_ScaleKey(g, d) for d in dqs])
            if len(reps) > 1 and out_qs:
                detail = ", ".join(f"{g.name(k.node)}={k.text()}" for k in reps)
                self.add("warning", "add-scale-mismatch", node,
                         f"the Add's inputs are dequantized with different scales ({detail}) and its output is "
                         "re-quantized: TensorRT must requantize one input",
                         "share one quantizer between the two Add inputs (QuantAdd with a shared scale)")
            return
        if any(d is not None for d in dqs):
            return
        if any(self.from_weighted(t) for t in inputs):
            self.add("warning", "add-not-fused", node,
                     "residual Add with no quantized input: TensorRT cannot fuse it into the conv epilogue in "
                     "INT8, so the conv writes float and the Add runs in float",
                     "quantize the skip (residual) input with a Q/DQ pair (e.g. QuantAdd) so the Add fuses into "
                     "the conv")

    def check_commuting(self, node):
        g = self.g
        if not node.input or not node.output or not self.nearest(node):
            return
        in_keys = self.tensor_scales(node.input[0])
        out_keys = []
        for out in node.output:
            if out:
                out_keys += self.tensor_scales(out)
        reps = _distinct(in_keys + out_keys)
        if len(reps) > 1:
            detail = ", ".join(f"{g.name(k.node)}={k.text()}" for k in reps[:4])
            self.add("warning", "commuting-scale-mismatch", node,
                     f"input and output of {node.op_type} are quantized with different scales ({detail}); "
                     "TensorRT can only run it in INT8 between equal scales, so it inserts a requantize",
                     f"give the {node.op_type}'s output Q the same quantizer as its input")
            return
        # A DQ on the input moves forward through the op and a Q on the output moves backward, so one quantized
        # side is normally fine. A reformat is needed when the input tensor is quantized only for *other*
        # consumers (sibling Q, no DQ) while this op reads it in float, or when the output is re-quantized and
        # also read in float.
        in_dq = self.dq_producer(node.input[0]) is not None
        out_qs, out_float = [], []
        for out in node.output:
            if out:
                qs, others = self.q_consumers(out)
                out_qs += qs
                out_float += [c for c in others if c is None or c.op_type not in WEIGHTED_OPS]
        if in_keys and not in_dq and not out_keys:
            self.add("warning", "commuting-partial", node,
                     f"{node.op_type}'s input is quantized for other consumers but this op reads it in float and "
                     "its output is not quantized: the producer must write both INT8 and float (a reformat)",
                     f"quantize the {node.op_type}'s output with the same quantizer as its input, or leave the "
                     "input unquantized")
        elif out_qs and out_float and not in_dq:
            self.add("warning", "commuting-partial", node,
                     f"{node.op_type}'s output is both re-quantized and read in float: TensorRT keeps a float copy "
                     "and adds a reformat", "quantize every consumer of the output with one shared quantizer")

    def check_multi_scale_tensors(self):
        """One float tensor quantized by several Q nodes with different scales (e.g. a feature map read by two
        convs whose input quantizers were calibrated apart): its producer cannot write one INT8 output."""
        g = self.g
        covered = {"Concat"} | SCALE_SHARING_OPS
        for tensor, consumers in g.consumers.items():
            if g.is_const(tensor):
                continue
            direct_q = [c for c in consumers if c.op_type == "QuantizeLinear" and c.input[0] == tensor]
            if not direct_q:
                continue
            producer = g.producer.get(tensor)
            if (producer is not None and producer.op_type in covered) or any(c.op_type in covered
                                                                             for c in consumers):
                continue  # reported by the Concat / MaxPool / Resize checks
            qs, _ = self.q_consumers(tensor)
            reps = _distinct([_ScaleKey(g, q) for q in qs])
            if len(reps) < 2:
                continue
            where = producer if producer is not None else direct_q[0]
            detail = ", ".join(f"{g.name(k.node)}={k.text()}" for k in reps[:4])
            self.add("warning", "multi-scale-tensor", where,
                     f"output '{tensor}' is quantized by {len(reps)} Q nodes with different scales ({detail}); "
                     "the producer cannot write a single INT8 tensor, so TensorRT adds requantize layers",
                     "share one quantizer among all consumers of this tensor (identical scales)")

    def check_requantize_chains(self):
        g = self.g
        for node in g.nodes:
            if node.op_type != "DequantizeLinear":
                continue
            qs, _ = self.q_consumers(node.output[0])
            mine = _ScaleKey(g, node)
            if not mine.known():
                continue
            for q in qs:
                other = _ScaleKey(g, q)
                if not other.known():
                    continue
                if mine.same(other):
                    self.add("info", "redundant-dq-q", node,
                             f"DQ feeds Q {g.name(q)} with the same scale: a no-op round trip", "")
                else:
                    self.add("warning", "requantize-chain", node,
                             f"Q -> DQ -> Q chain: this DQ (scale {mine.text()}) feeds Q {g.name(q)} with scale "
                             f"{other.text()}; TensorRT inserts a requantize",
                             "use one quantizer for both, or remove the second Q/DQ pair")

    def run(self):
        import onnx

        self.check_opset()
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, check_type=False, strict_mode=False)
            self.g.add_shapes(inferred)
            self.stats["shape_inference"] = "ok"
        except Exception as exc:  # large models (>2 GB) or custom ops
            LOG.warning("ONNX shape inference failed (%s); MAC counts use the shapes stored in the model", exc)
            self.stats["shape_inference"] = f"failed: {type(exc).__name__}"
        self.check_qdq_nodes()
        self.check_weighted()
        has_qdq = self.stats.get("quantize_nodes", 0) + self.stats.get("dequantize_nodes", 0) > 0
        if has_qdq:
            for node in self.g.nodes:
                if node.op_type == "Concat":
                    self.check_concat(node)
                elif node.op_type in ("Add", "Sum"):
                    self.check_add(node)
                elif node.op_type in SCALE_SHARING_OPS:
                    self.check_commuting(node)
            self.check_multi_scale_tensors()
            self.check_requantize_chains()
        counts = {}
        for f in self.findings:
            counts[f.code] = counts.get(f.code, 0) + 1
        self.stats.update({
            "nodes": len(self.g.nodes),
            "scale_mismatches": sum(1 for f in self.findings if f.code in MISMATCH_CODES),
            "requantize_chains": counts.get("requantize-chain", 0),
            "reformat_sites": sum(1 for f in self.findings if f.reformat),
            "errors": sum(1 for f in self.findings if f.severity == "error"),
            "warnings": sum(1 for f in self.findings if f.severity == "warning"),
            "finding_counts": counts,
        })
        return self.findings, self.stats


def lint_onnx(model_or_path, skip_nodes=None) -> LintReport:
    """Lint the Q/DQ placement of an ONNX model for TensorRT explicit quantization.

    Args:
        model_or_path (onnx.ModelProto | str | Path): the model or the path of an ``.onnx`` file.
        skip_nodes (list[str]): regular expressions (``re.search`` on node names) of weighted layers left in
            float on purpose; they are reported as ``float-by-choice`` and excluded from
            ``int8_coverage_excluding_skipped``. Defaults to None (no layer skipped).

    Returns:
        LintReport: the findings and statistics (``int8_coverage``, ``scale_mismatches``,
        ``requantize_chains``, ``reformat_sites``, ``float_layers``, ...).

    Raises:
        TrtQatError: when the file is missing or is not a readable ONNX model, or a skip regex is invalid.
    """
    model, name = _load(model_or_path)
    try:
        linter = _Linter(model, skip_nodes)
    except re.error as exc:
        raise TrtQatError(f"invalid --skip regular expression ({exc}); quote it and escape special characters") \
            from None
    findings, stats = linter.run()
    return LintReport(findings=findings, stats=stats, model=name)
