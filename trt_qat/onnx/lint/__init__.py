"""Q/DQ placement linter for any ONNX model (ours, NVIDIA ModelOpt's, ``yolov7_qat``'s).

The linter is a pure graph walk (over onnx-graphsurgeon's view of the ONNX graph) plus ONNX shape inference. It
needs no model-specific configuration and predicts, from the placement of QuantizeLinear (Q) and
DequantizeLinear (DQ) nodes, where TensorRT's explicit-quantization builder will run INT8 and where it has to
insert requantize or reformat layers.

Checks, following TensorRT's Q/DQ placement recommendations:

- every Conv / ConvTranspose / Gemm / MatMul: INT8-eligible (activation and weight both arrive through DQ,
  possibly through commuting ops such as Reshape, Transpose or MaxPool) or why not;
- scale mismatches (compared by value) around Concat, Add, MaxPool, Resize(nearest) and other commuting ops;
- DQ -> Q requantize chains with different scales;
- dangling or dead Q / DQ nodes;
- non-zero or uint8 zero-points, per-tensor weight scales, a wrong weight axis, an opset below 13;
- predicted INT8 coverage of the weighted ops' multiply-accumulates and the predicted number of
  requantize/reformat sites.

Modules: :mod:`~trt_qat.onnx.lint.report` (findings and the report), :mod:`~trt_qat.onnx.lint.graph` (the graph
view and scale keys), :mod:`~trt_qat.onnx.lint.walks` (how Q/DQ moves through ops),
:mod:`~trt_qat.onnx.lint.checks_nodes`, :mod:`~trt_qat.onnx.lint.checks_layers` and
:mod:`~trt_qat.onnx.lint.checks_scales` (the checks), :mod:`~trt_qat.onnx.lint.core` (:func:`lint_onnx`).

CLI: ``trt-qat lint model.onnx [--json out.json] [--strict] [--skip REGEX ...]``.
"""
from __future__ import annotations

from trt_qat.onnx.lint.checks_nodes import UNSUPPORTED_QUANT_OPS
from trt_qat.onnx.lint.core import lint_onnx
from trt_qat.onnx.lint.report import MISMATCH_CODES, REFORMAT_CODES, SEVERITIES, Finding, LintReport
from trt_qat.onnx.lint.walks import EPILOGUE_OPS, PASS_THROUGH_OPS, SCALE_SHARING_OPS, WEIGHTED_OPS

__all__ = ["lint_onnx", "Finding", "LintReport", "SEVERITIES", "MISMATCH_CODES", "REFORMAT_CODES",
           "WEIGHTED_OPS", "PASS_THROUGH_OPS", "SCALE_SHARING_OPS", "EPILOGUE_OPS", "UNSUPPORTED_QUANT_OPS"]
