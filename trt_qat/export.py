"""ONNX export with QuantizeLinear/DequantizeLinear pairs.

Uses the TorchScript exporter (``dynamo=False``: the dynamo exporter cannot trace ``TensorQuantizer``), checks the
result with ``onnx.checker`` and runs it once in ONNX Runtime before returning. Quantizers export as Q/DQ pairs
with zero-point 0: per-channel (axis 0, or 1 for ConvTranspose) for weights, per-tensor for activations.
"""
from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cli import imgsz
from .config import check_opset
from .errors import LOG, TrtQatError, cli_main
from .fileio import atomic_path
from .quantize import check_amax, iter_quantizers

__all__ = ["export_onnx", "fb_fake_quant", "main"]



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
                input_names=("images",), output_names=("output",), check: bool = True) -> Path:
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


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(prog="trt-qat export", description="Export an FP32 or quantized (calibrated/QAT) "
                                     "checkpoint to ONNX; quantized models get Q/DQ pairs.")
    parser.add_argument("--checkpoint", required=True, help="FP32 (trt-qat train) or quantized (calibrate/qat) .pt")
    parser.add_argument("--output", "-o", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 13). Default 17")
    parser.add_argument("--imgsz", type=imgsz, default=128, help="input size, a multiple of 32. Default 128")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1")
    args = parser.parse_args(argv)
    check_opset(args.opset)
    from .quantize import load_model

    model, _, _ = load_model(args.checkpoint)
    export_onnx(model, torch.zeros(1, 3, args.imgsz, args.imgsz), args.output, opset=args.opset,
                dynamic_batch=not args.static_batch)
    print(f"exported {args.output}")
    return 0


if __name__ == "__main__":
    main()
