"""`trt-qat eval`: the command line over :mod:`trt_qat.measure.evaluate`."""
from __future__ import annotations

from pathlib import Path

from trt_qat.cli.args import ArgumentParser, cli_main
from trt_qat.measure.evaluate import evaluate


def _runner_from_args(args):
    """Build the runner named on the command line: a checkpoint (PyTorch), an ONNX (ORT) or an engine (TensorRT)."""
    if args.engine:
        from trt_qat.runners.trt import TrtRunner

        return TrtRunner(args.engine), "trt", "int8/fp16 (engine)"
    if args.onnx:
        from trt_qat.onnx.io import has_qdq, load_onnx
        from trt_qat.runners.onnxrt import OnnxrtRunner

        precision = "int8 (Q/DQ)" if has_qdq(load_onnx(args.onnx)) else "fp32"
        return OnnxrtRunner(args.onnx, providers=args.providers), "onnxruntime", precision
    from trt_qat.runners.torch_runner import torch_runner_from_checkpoint

    runner, precision = torch_runner_from_checkpoint(args.checkpoint, family=args.model_family)
    return runner, "torch", precision


@cli_main
def main(argv=None):

    from trt_qat.cli.args import add_data_args, make_dataset, resolve_imgsz, unit_interval
    from trt_qat.fileio import atomic_write_json, check_not_input, check_writable_file
    from trt_qat.models.adapter import FAMILY_MODULES

    parser = ArgumentParser(prog="trt-qat eval", description="COCO mAP (pycocotools) of a checkpoint, ONNX "
                                     "or TensorRT engine, with the same pre-processing, decoding and NMS for all.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="FP32 or quantized PyTorch checkpoint")
    src.add_argument("--onnx", help="ONNX model, run with ONNX Runtime")
    src.add_argument("--engine", help="TensorRT engine (needs tensorrt + pycuda)")
    parser.add_argument("--model-family", default=None, choices=sorted(FAMILY_MODULES),
                        help="for an FP32 --checkpoint in a family's own format (an Ultralytics .pt); default: "
                             "recognised from the checkpoint")
    add_data_args(parser, default_split="val")
    parser.add_argument("--providers", default=None, help="ONNX Runtime providers: cpu, cuda, trt (default cpu)")
    parser.add_argument("--conf-thres", type=unit_interval, default=0.001, help="score threshold in [0, 1]")
    parser.add_argument("--iou-thres", type=unit_interval, default=0.6, help="NMS IoU threshold in [0, 1]")
    parser.add_argument("--variant", default=None, help="row name in the report (default: the file name)")
    parser.add_argument("--json", default=None, help="write the result as a report row (for `trt-qat report`); "
                                                        "checked writable before the evaluation runs")
    args = parser.parse_args(argv)
    if args.json:  # before the evaluation, not after it
        check_not_input(args.json, args.checkpoint, args.onnx, args.engine, args.data, flag="--json")
        check_writable_file(args.json)
    runner, backend, precision = _runner_from_args(args)
    adapter = None
    if backend == "torch":  # the model's family decodes it, and its classes must be the data's
        from trt_qat.models.adapter import adapter_for_model

        adapter = adapter_for_model(runner.model)
        resolve_imgsz(args, runner.model, adapter=adapter)
    else:
        resolve_imgsz(args, onnx=args.onnx)
    dataset = make_dataset(args, split=args.split)
    if adapter is not None:
        adapter.check_dataset(runner.model, dataset, f"--data {args.data}")
    with runner:
        res = evaluate(runner, dataset, batch_size=args.batch_size, conf_thres=args.conf_thres,
                       iou_thres=args.iou_thres, pad_to_batch=backend == "trt", adapter=adapter)
    source = args.checkpoint or args.onnx or args.engine
    row = {"variant": args.variant or Path(source).stem, "backend": backend, "precision": precision,
           "batch": args.batch_size, "map50": res["map50"], "map50_95": res["map50_95"], "images": res["images"],
           "source": source}
    if args.json:
        atomic_write_json(args.json, row)
    print(f"{row['variant']} ({backend}): mAP50 {res['map50']:.4f}  mAP50-95 {res['map50_95']:.4f} on "
          f"{res['images']} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
