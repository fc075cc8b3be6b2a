"""`trt-qat export`: the command line over :mod:`trt_qat.onnx.export`."""
from __future__ import annotations

from trt_qat.cli.args import ArgumentParser, cli_main, imgsz, resolve_imgsz
from trt_qat.config import check_opset
from trt_qat.fileio import check_not_input
from trt_qat.models.adapter import FAMILY_MODULES
from trt_qat.onnx.export import export_onnx


@cli_main
def main(argv=None):
    parser = ArgumentParser(prog="trt-qat export", description="Export an FP32 or quantized (calibrated/QAT) "
                                     "checkpoint to ONNX; quantized models get Q/DQ pairs.")
    parser.add_argument("--checkpoint", required=True, help="FP32 (trt-qat train) or quantized (calibrate/qat) .pt")
    parser.add_argument("--output", "-o", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 13). Default 17")
    parser.add_argument("--imgsz", type=imgsz, default=None, help="input size, a multiple of the model's largest "
                        "stride (default: the size the checkpoint records, else 128)")
    parser.add_argument("--model-family", default=None, choices=sorted(FAMILY_MODULES),
                        help="for an FP32 checkpoint in a family's own format (an Ultralytics .pt); default: "
                             "recognised from the checkpoint")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1")
    args = parser.parse_args(argv)
    check_opset(args.opset)
    check_not_input(args.output, args.checkpoint, flag="--output")
    from trt_qat.models.adapter import adapter_for_model
    from trt_qat.quant.checkpoint import load_model

    model, _, _ = load_model(args.checkpoint, args.model_family)
    adapter = adapter_for_model(model)
    resolve_imgsz(args, model, adapter=adapter)
    export_onnx(model, adapter.sample_input(args.imgsz), args.output, opset=args.opset,
                dynamic_batch=not args.static_batch, input_names=adapter.input_names,
                output_names=adapter.output_names, float_layers=adapter.float_layers(model))
    print(f"exported {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
