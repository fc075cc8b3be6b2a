"""ONNX export with QuantizeLinear/DequantizeLinear pairs.

Uses the TorchScript exporter (``dynamo=False``: the dynamo exporter cannot trace ``TensorQuantizer``), checks the
result with ``onnx.checker`` and runs it once in ONNX Runtime before returning. Quantizers export as Q/DQ pairs
with zero-point 0: per-channel (axis 0, or 1 for ConvTranspose) for weights, per-tensor for activations.
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trt_qat.config import check_opset
from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_path
from trt_qat.onnx.io import FLOAT_LAYERS_KEY
from trt_qat.quant.instrument import check_amax
from trt_qat.quant.quantizer import iter_quantizers

__all__ = ["export_onnx", "fb_fake_quant", "module_node_pattern"]


def module_node_pattern(module_name: str) -> str:
    """A regex matching the ONNX nodes the TorchScript exporter makes from module ``module_name``: their names are
    the module scopes joined by ``/`` (``/model.22/dfl/conv/Conv`` for ``model.22.dfl.conv``: a ``Sequential``
    child keeps its ``parent.index`` form)."""
    return "^/" + "[./]".join(re.escape(part) for part in module_name.split(".")) + "/"



@contextlib.contextmanager
def fb_fake_quant():
    """Set pytorch-quantization's class-wide ``use_fb_fake_quant`` for the duration, then restore it."""
    from pytorch_quantization.nn import TensorQuantizer

    old = TensorQuantizer.use_fb_fake_quant
    TensorQuantizer.use_fb_fake_quant = True
    try:
        yield
    finally:
        TensorQuantizer.use_fb_fake_quant = old


def export_onnx(model: nn.Module, sample_input: torch.Tensor, path, opset: int = 17, dynamic_batch: bool = True,
                input_names=("images",), output_names=("output",), check: bool = True,
                float_layers: dict | None = None) -> Path:
    """Export ``model`` (quantized or float) to ONNX at ``path`` (written atomically).

    Args:
        model (nn.Module): the model; quantized models must be calibrated.
        sample_input (torch.Tensor): an example input (its batch dimension becomes dynamic).
        path (str): output file.
        opset (int): ONNX opset, at least 13. Defaults to 17.
        dynamic_batch (bool): Defaults to True.
        input_names (tuple[str]): Defaults to ("images",).
        output_names (tuple[str]): Defaults to ("output",).
        check (bool): run onnx.checker and one ONNX Runtime inference. Defaults to True.
        float_layers (dict | None): ``{module name: reason}`` of layers kept in float on purpose (the adapter's
            ``float_layers``), written to the ONNX metadata (:data:`FLOAT_LAYERS_KEY`) for the linter. Defaults to
            None (nothing written).

    Returns:
        Path: ``path``.
    """
    check_opset(opset)
    quantized = any(True for _ in iter_quantizers(model))
    if quantized:
        check_amax(model, stage="export")
    path = Path(path)
    device = next(iter(model.parameters())).device if any(True for _ in model.parameters()) else torch.device("cpu")
    model_was_training = model.training
    model.eval()
    sample_input = sample_input.to(device)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    try:
        with atomic_path(path) as tmp, fb_fake_quant(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (sample_input,), str(tmp), opset_version=opset, dynamo=False,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
            if float_layers:
                _write_float_layers(tmp, float_layers)
            if check:
                _check_onnx(tmp, sample_input, output_names)
    except TrtQatError:
        raise
    except Exception as exc:
        raise TrtQatError(f"ONNX export failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
                          "check that the model traces with torch.jit.trace") from None
    finally:
        model.train(model_was_training)
    LOG.info("exported %s (%s, opset %d)", path, "Q/DQ" if quantized else "float", opset)
    return path


def _write_float_layers(path, float_layers: dict):
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = FLOAT_LAYERS_KEY
    entry.value = json.dumps({module_node_pattern(name): str(reason) for name, reason in sorted(float_layers.items())})
    onnx.save(proto, str(path))


def _check_onnx(path, sample_input, output_names):
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: sample_input.detach().cpu().numpy().astype(np.float32)}
    outs = sess.run(None, feed)
    for name, out in zip(output_names, outs):
        if not np.isfinite(out).all():
            raise TrtQatError(f"the exported ONNX produced non-finite values in output '{name}'; check the amax "
                              "values (trt-qat calibrate) and the model's forward")
