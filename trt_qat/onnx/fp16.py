"""FP16 ONNX for strongly typed TensorRT builds (TensorRT 11, or 10.x with ``--stronglyTyped``).

A strongly typed network takes each layer's precision from the graph's types, so "INT8 with FP16 for the
layers Q/DQ leaves unquantized" means: convert the ONNX's float tensors to FP16 *before* TensorRT parses it,
keeping

* every QuantizeLinear / DequantizeLinear node in FP32, with its scale and zero-point initializers untouched
  (they are in the converter's op block list, so it casts around them instead of rewriting them);
* the graph's input and output types (``keep_io_types``), so pre- and post-processing do not change.

The conversion is ONNX-only: it runs on CPU, and ONNX Runtime can check the result against the FP32 model
(as ``tests/onnx/test_fp16.py`` does).

The file is read through :func:`trt_qat.onnx.io.load_onnx`. The Q/DQ checks around the conversion
(:func:`qdq_parameters` and the Q/DQ signature) scan ``model.graph`` directly instead of going through
onnx-graphsurgeon like the linter: they are flat scans of the Q/DQ nodes that need no producer/consumer links, and
on ``reports/demo/artifacts/model_qat_qdq.onnx`` (814 nodes, 219 Q/DQ parameters; median of 9 runs) importing the
input and the output model into graphsurgeon took about 80 ms against 6-10 ms for the two scans, a quarter more
on top of the 300 ms conversion itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_path, require_file
from trt_qat.onnx.io import QDQ_OPS, load_onnx

__all__ = ["convert_to_fp16", "convert_model_to_fp16", "qdq_parameters", "QDQ_OPS", "FP16_OP_BLOCK_LIST"]

_UNREADABLE = "'{path}' cannot be read as ONNX ({error}); re-export it with `trt-qat export`"

#: ops kept in FP32: Q/DQ (scales must stay exact) plus index/box ops whose FP16 versions lose precision
FP16_OP_BLOCK_LIST = QDQ_OPS + ("NonMaxSuppression", "TopK", "RoiAlign", "Range", "CumSum", "RandomUniformLike")


def qdq_parameters(model) -> dict:
    """``{tensor_name: np.ndarray}`` for every scale / zero-point input of a Q/DQ node that is an initializer
    or a Constant node's output. Used to prove a rewrite left them untouched."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    params = {}
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            for name in node.input[1:]:
                if not name:
                    continue
                tensor = inits.get(name, consts.get(name))
                if tensor is not None:
                    params[name] = numpy_helper.to_array(tensor)
    return params


def _qdq_signature(model) -> list:
    return sorted((n.op_type, tuple(n.input[1:])) for n in model.graph.node if n.op_type in QDQ_OPS)


def convert_model_to_fp16(model, keep_io_types: bool = True, op_block_list=None, backend: str = "onnxconverter"):
    """Convert an in-memory ``onnx.ModelProto`` to FP16 with Q/DQ kept in FP32; return the new model.

    Args:
        model (onnx.ModelProto): the model (not modified).
        keep_io_types (bool): keep the graph inputs/outputs in FP32. Defaults to True.
        op_block_list (list[str] | None): op types kept in FP32. Q/DQ are always added.
            Defaults to :data:`FP16_OP_BLOCK_LIST`.
        backend (str): "onnxconverter" (onnxconverter-common's float16 converter) or "modelopt"
            (``modelopt.onnx.autocast``, where installed). Defaults to "onnxconverter".

    Returns:
        onnx.ModelProto: the converted model.
    """
    import copy

    blocked = list(dict.fromkeys(list(op_block_list or FP16_OP_BLOCK_LIST) + list(QDQ_OPS)))
    before = qdq_parameters(model)
    signature = _qdq_signature(model)
    if backend == "modelopt":
        try:
            from modelopt.onnx.autocast.convert import convert_to_f16
        except ImportError:
            raise TrtQatError("backend 'modelopt' needs NVIDIA ModelOpt (`pip install nvidia-modelopt[onnx]`); "
                              "or use the default onnxconverter backend") from None
        out = convert_to_f16(copy.deepcopy(model), low_precision_type="fp16", keep_io_types=keep_io_types,
                             op_block_list=blocked)
    elif backend == "onnxconverter":
        try:
            from onnxconverter_common import float16
        except ImportError:
            raise TrtQatError("onnxconverter-common is not installed; `pip install onnxconverter-common`") from None
        out = float16.convert_float_to_float16(copy.deepcopy(model), keep_io_types=keep_io_types,
                                               op_block_list=blocked)
    else:
        raise TrtQatError(f"unknown FP16 conversion backend '{backend}'; use 'onnxconverter' or 'modelopt'")

    # Q/DQ must come through exactly: same nodes, same scale / zero-point tensors, same dtypes and values.
    after = qdq_parameters(out)
    if _qdq_signature(out) != signature:
        raise TrtQatError(f"the {backend} FP16 conversion changed the Q/DQ nodes; report this, and build "
                          "weakly typed (TensorRT 10: drop --stronglyTyped) meanwhile")
    for name, value in before.items():
        new = after.get(name)
        if new is None or new.dtype != value.dtype or not np.array_equal(new, value):
            raise TrtQatError(f"the {backend} FP16 conversion changed the Q/DQ parameter '{name}'; report this, "
                              "and build weakly typed (TensorRT 10: drop --stronglyTyped) meanwhile")
    n_fp16 = sum(1 for i in out.graph.initializer if i.data_type == 10)  # TensorProto.FLOAT16
    LOG.info("FP16 ONNX: %d initializers in FP16, %d Q/DQ parameters kept in their original types",
             n_fp16, len(before))
    return out


def convert_to_fp16(onnx_in, onnx_out=None, keep_io_types: bool = True, op_block_list=None,
                    backend: str = "onnxconverter") -> Path:
    """Write an FP16 copy of ``onnx_in`` whose Q/DQ nodes, scales and I/O types are unchanged.

    Args:
        onnx_in (str | Path): the FP32 (Q/DQ) ONNX.
        onnx_out (str | Path | None): where to write it. Defaults to ``<stem>_fp16.onnx`` beside the input.
        keep_io_types (bool): keep graph inputs/outputs in FP32. Defaults to True.
        op_block_list (list[str] | None): op types kept in FP32 (Q/DQ always are). Defaults to
            :data:`FP16_OP_BLOCK_LIST`.
        backend (str): "onnxconverter" or "modelopt". Defaults to "onnxconverter".

    Returns:
        Path: the written file (written atomically).
    """
    import onnx

    onnx_in = require_file(onnx_in, "ONNX file", "export one with `trt-qat export`")
    onnx_out = Path(onnx_out) if onnx_out else onnx_in.with_name(onnx_in.stem + "_fp16.onnx")
    if onnx_out.resolve() == onnx_in.resolve():
        raise TrtQatError(f"the FP16 ONNX would overwrite its input '{onnx_in}'; choose another output path")
    model = load_onnx(onnx_in, load_external_data=True, unreadable=_UNREADABLE, check=False)
    out = convert_model_to_fp16(model, keep_io_types=keep_io_types, op_block_list=op_block_list, backend=backend)
    with atomic_path(onnx_out) as tmp:
        onnx.save(out, str(tmp))
    LOG.info("wrote %s", onnx_out)
    return onnx_out
