""":func:`lint_onnx`: load the model, build its graph view, run the checks in order and count the findings."""
from __future__ import annotations

import contextlib
import re

from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import require_file
from trt_qat.onnx.io import declared_float_layers, load_onnx
from trt_qat.onnx.lint.checks_layers import check_weighted
from trt_qat.onnx.lint.checks_nodes import check_opset, check_qdq_nodes
from trt_qat.onnx.lint.checks_scales import (
    check_add,
    check_commuting,
    check_concat,
    check_multi_scale_tensors,
    check_requantize_chains,
)
from trt_qat.onnx.lint.checks_sparsity import DEFAULT_MIN_CHANNELS, check_sparsity
from trt_qat.onnx.lint.report import MISMATCH_CODES, Finding, LintReport
from trt_qat.onnx.lint.walks import SCALE_SHARING_OPS, QdqGraph

__all__ = ["LintContext", "lint_onnx"]

_UNREADABLE = ("cannot read ONNX model '{path}' ({error}: {detail}); check that the file is a complete ONNX "
               "export (re-export it if it was truncated)")


class LintContext:
    """What the checks share: the graph, the skip patterns, and the findings and statistics collected so far.

    Args:
        model (onnx.ModelProto): the model.
        skip_nodes (list[str] | None): regular expressions of node names left in float on purpose.
        sparsity_min_channels (int): the channel count from which a 2:4 conv counts as ready for sparse kernels.
            Defaults to 256.

    Raises:
        re.error: when a skip pattern is not a valid regular expression.
    """

    def __init__(self, model, skip_nodes, sparsity_min_channels: int = DEFAULT_MIN_CHANNELS):
        self.model = model
        self.sparsity_min_channels = int(sparsity_min_channels)
        self.g = QdqGraph(model)
        self.declared = {re.compile(p): why for p, why in declared_float_layers(model).items()}
        self.skip = [*(re.compile(p) for p in (skip_nodes or [])), *self.declared]
        self.findings = []
        self.stats = {}

    def add(self, severity, code, node, message, fix=""):
        """Record a finding about ``node`` (an onnx-graphsurgeon Node)."""
        self.findings.append(Finding(severity, code, self.g.name(node), message, fix, node.op))

    def declared_reason(self, node) -> str | None:
        """The reason the ONNX's metadata gives for keeping ``node`` in float (the model family's choice), if any."""
        name = self.g.name(node)
        return next((why for p, why in self.declared.items() if p.search(name)), None)

    def is_skipped(self, node) -> bool:
        name = self.g.name(node)
        return any(p.search(name) for p in self.skip)

    def run(self):
        """Run every check; returns ``(findings, stats)``."""

        check_opset(self)
        try:
            inferred = static_shapes(self.model)
            self.g.add_shapes(inferred)
            self.stats["shape_inference"] = "ok"
        except Exception as exc:  # large models (>2 GB) or custom ops
            LOG.warning("ONNX shape inference failed (%s); MAC counts use the shapes stored in the model", exc)
            self.stats["shape_inference"] = f"failed: {type(exc).__name__}"
        check_qdq_nodes(self)
        check_weighted(self)
        check_sparsity(self, self.sparsity_min_channels)
        has_qdq = self.stats.get("quantize_nodes", 0) + self.stats.get("dequantize_nodes", 0) > 0
        if has_qdq:
            for node in self.g.nodes:
                if node.op == "Concat":
                    check_concat(self, node)
                elif node.op in ("Add", "Sum"):
                    check_add(self, node)
                elif node.op in SCALE_SHARING_OPS:
                    check_commuting(self, node)
            check_multi_scale_tensors(self)
            check_requantize_chains(self)
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


@contextlib.contextmanager
def _quiet_onnxruntime():
    """ONNX Runtime's default logger at errors only, for the duration (it is process-wide)."""
    try:
        import onnxruntime as ort
    except ImportError:
        yield
        return
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # (its default: warnings)


def static_shapes(model):
    """``model`` with every intermediate shape ONNX can know at batch 1: a copy whose symbolic input dimensions are
    fixed to 1, shape-inferred with the ``Shape`` -> ``Slice`` arithmetic of the exporter folded
    (onnx-graphsurgeon ``fold_constants(fold_shapes=True)``). Without the folding, a ``Slice`` whose bounds are
    computed (``torch.chunk`` under a dynamic batch: every Ultralytics C2f) leaves its output's shape unknown, and
    the MACs of every conv after it would be counted at 1x1. Falls back to plain shape inference when folding fails;
    the original model is not changed."""
    import onnx

    plain = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    try:
        import onnx_graphsurgeon as gs

        work = onnx.ModelProto()
        work.CopyFrom(model)
        inits = {i.name for i in work.graph.initializer}
        for vi in work.graph.input:
            if vi.name in inits or not vi.type.HasField("tensor_type"):
                continue
            for d in vi.type.tensor_type.shape.dim:
                if not d.HasField("dim_value") or d.dim_value <= 0:
                    d.Clear()
                    d.dim_value = 1
        del work.graph.value_info[:]
        with _quiet_onnxruntime():  # (the folding runs ONNX Runtime, whose optimizer warns about what it skips)
            for _ in range(2):  # (a fold can expose further foldable shape arithmetic)
                work = onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False)
                graph = gs.import_onnx(work)
                graph.fold_constants(fold_shapes=True, error_ok=True)
                work = gs.export_onnx(graph.cleanup())
        folded = onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False)
    except Exception as exc:  # (custom ops, >2 GB models): the plain inference stands
        LOG.debug("shape folding failed (%s); plain ONNX shape inference is used", exc)
        return plain
    known = {vi.name for vi in folded.graph.value_info}
    for vi in plain.graph.value_info:  # tensors the folding removed (shape arithmetic itself) keep their shapes
        if vi.name not in known:
            folded.graph.value_info.append(vi)
    return folded


def _model_and_name(model_or_path):
    """The model (a ModelProto as given, or a file read through :func:`trt_qat.onnx.io.load_onnx`) and the name
    the report gives it."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<ModelProto>"
    path = require_file(model_or_path, "ONNX model", "pass the path of an exported .onnx file")
    model = load_onnx(path, load_external_data=True, unreadable=_UNREADABLE, check=False)
    if not model.graph.node:
        raise TrtQatError(f"ONNX model '{path}' has no graph nodes; check that the file is an ONNX model "
                          "and not a checkpoint or an engine")
    return model, str(path)


def lint_onnx(model_or_path, skip_nodes=None, sparsity_min_channels: int = DEFAULT_MIN_CHANNELS) -> LintReport:
    """Lint the Q/DQ placement of an ONNX model for TensorRT explicit quantization.

    Args:
        model_or_path (onnx.ModelProto | str | Path): the model or the path of an ``.onnx`` file.
        skip_nodes (list[str]): regular expressions (``re.search`` on node names) of weighted layers left in
            float on purpose; they are reported as ``float-by-choice`` and excluded from
            ``int8_coverage_excluding_skipped``. Defaults to None (no layer skipped).
        sparsity_min_channels (int): convs with fewer input or output channels do not count as 2:4-ready
            (``stats["sparsity"]``). Defaults to 256.

    Returns:
        LintReport: the findings and statistics (``int8_coverage``, ``scale_mismatches``,
        ``requantize_chains``, ``reformat_sites``, ``float_layers``, ...).

    Raises:
        TrtQatError: when the file is missing or is not a readable ONNX model, or a skip regex is invalid.
    """
    model, name = _model_and_name(model_or_path)
    try:
        ctx = LintContext(model, skip_nodes, sparsity_min_channels)
    except re.error as exc:
        raise TrtQatError(f"invalid --skip regular expression ({exc}); quote it and escape special characters") \
            from None
    findings, stats = ctx.run()
    return LintReport(findings=findings, stats=stats, model=name)
