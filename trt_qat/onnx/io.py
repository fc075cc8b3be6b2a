"""The one ONNX loader, and the small questions every stage asks of an ONNX graph (Q/DQ present, opset, inputs).

The linter, the FP16 pass, the engine builder, evaluation and the benchmark all load through :func:`load_onnx`,
so a missing, corrupt or non-ONNX file is a one-line error everywhere (in the same words, except where a tool
words the unreadable-file error for its own users through ``unreadable``).
"""
from __future__ import annotations

from pathlib import Path

from trt_qat.errors import TrtQatError
from trt_qat.fileio import require_file

__all__ = ["QDQ_OPS", "FLOAT_LAYERS_KEY", "load_onnx", "has_qdq", "onnx_opset", "onnx_inputs", "static_input_size",
           "declared_float_layers"]

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: ONNX metadata key: ``{node-name regex: reason}`` of the layers the model family keeps in float on purpose
#: (written by :func:`trt_qat.onnx.export.export_onnx`); the linter counts them as deliberate, not as lost coverage
FLOAT_LAYERS_KEY = "trt_qat.float_layers"
_UNREADABLE = "'{path}' is corrupt or not an ONNX model ({error}); re-export it with `trt-qat export`"


def load_onnx(path, load_external_data: bool = False, *, unreadable: str = _UNREADABLE, check: bool = True):
    """Load an ONNX file or raise a one-line TrtQatError saying it is missing, corrupt or not ONNX.

    Args:
        path (str | Path): the file.
        load_external_data (bool): also load external weight files. Defaults to False (the graph is enough).
        unreadable (str): the error message for a file ONNX cannot parse, a template with the fields ``{path}``,
            ``{error}`` (the exception's type) and ``{detail}`` (the first 200 characters of its message), for
            tools that word it for their own users (the linter reads other exporters' files). Defaults to
            "'{path}' is corrupt or not an ONNX model ({error}); re-export it with `trt-qat export`".
        check (bool): refuse a parsed model with no IR version, graph nodes or outputs. Defaults to True; a
            caller that passes False checks what it needs itself.

    Returns:
        onnx.ModelProto: the model.
    """
    import onnx

    path = require_file(path, "ONNX file", "export one with `trt-qat export`")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise TrtQatError(unreadable.format(path=path, error=type(exc).__name__, detail=str(exc)[:200])) from None
    if check and (model.ir_version <= 0 or not model.graph.node or not model.graph.output):
        raise TrtQatError(f"'{path}' is not an ONNX model (no graph nodes or outputs); "
                          "re-export it with `trt-qat export`")
    return model


def has_qdq(model_or_path) -> bool:
    """Whether the ONNX (model or path) has QuantizeLinear/DequantizeLinear nodes."""
    model = load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def onnx_opset(model) -> int:
    """The default-domain ("" or "ai.onnx") opset version of the model, or 0 if none is declared."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def onnx_inputs(model) -> dict:
    """``{name: [dim, ...]}`` of the graph's real inputs; a dynamic dimension is None."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None)
        out[vi.name] = dims
    return out


def static_input_size(model_or_path) -> int | None:
    """The image size of a detector ONNX whose first input is ``[N, C, S, S]`` with a static ``S``; else None."""
    model = load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    dims = next(iter(onnx_inputs(model).values()), [])
    if len(dims) == 4 and dims[2] is not None and dims[2] == dims[3]:
        return int(dims[2])
    return None


def declared_float_layers(model) -> dict:
    """``{node-name regex: reason}`` that the ONNX's metadata (:data:`FLOAT_LAYERS_KEY`) declares float on purpose;
    empty when it declares none or the entry is not such a mapping."""
    import json

    for entry in model.metadata_props:
        if entry.key == FLOAT_LAYERS_KEY:
            try:
                value = json.loads(entry.value)
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}
