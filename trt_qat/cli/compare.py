"""`trt-qat compare`: the command line over :mod:`trt_qat.measure.compare`."""
from __future__ import annotations

import argparse

from trt_qat.cli.args import ArgumentParser, cli_main, non_negative_float, non_negative_int, positive_int, unit_interval
from trt_qat.errors import LOG, TrtQatError, setup_logging
from trt_qat.fileio import atomic_write_json, check_not_input, check_writable_file
from trt_qat.measure.compare import DEFAULT_THRESHOLDS, compare_runners, format_report, load_npz_feed
from trt_qat.models.adapter import FAMILY_MODULES


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="trt-qat compare",
                                description="Run several backends on the same inputs and compare their outputs "
                                            "with the first (max-abs, mean-abs, cosine).")
    p.add_argument("--onnx", action="append", required=True,
                   help="ONNX model run with ONNX Runtime; repeat to compare several (the first is the reference)")
    p.add_argument("--engine", action="append", default=[], help="TensorRT engine to compare too (repeatable)")
    p.add_argument("--checkpoint", default=None,
                   help="PyTorch checkpoint (FP32 or quantized fake-quant); when given it is the reference")
    p.add_argument("--model-family", default=None, choices=sorted(FAMILY_MODULES),
                   help="for an FP32 --checkpoint in a family's own format (an Ultralytics .pt); default: recognised "
                        "from the checkpoint")
    p.add_argument("--providers", default="cpu", help="ONNX Runtime providers for the ONNX runners (default: cpu)")
    p.add_argument("--input-shape", "--shapes", dest="shapes", default=None,
                   help="input shapes for random inputs, e.g. images:1x3x640x640")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch size for a dynamic batch dimension (default 1)")
    p.add_argument("--inputs", default=None, metavar="FILE.npz", help="inputs from an .npz instead of random ones")
    p.add_argument("--num-inputs", type=positive_int, default=4, help="number of random inputs (default 4)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--cosine", type=unit_interval, default=DEFAULT_THRESHOLDS["cosine"],
                   help="minimum cosine similarity (default 0.999)")
    p.add_argument("--max-abs", type=non_negative_float, default=None,
                   help="maximum absolute difference (default: not checked)")
    p.add_argument("--mean-abs", type=non_negative_float, default=None,
                   help="maximum mean absolute difference (default: not checked)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--exportJson", default=None, metavar="FILE",
                   help="write the report as JSON (checked writable before anything runs)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


@cli_main
def main(argv=None):
    """Exit status 0 when every runner agrees with the reference, 1 on disagreement, 2 on errors."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from trt_qat.measure.benchmark import make_feed
    from trt_qat.runners.onnxrt import OnnxrtRunner
    from trt_qat.trt.profile import parse_shapes

    if args.num_inputs < 1:
        raise TrtQatError(f"--num-inputs must be >= 1, got {args.num_inputs}")
    shapes = parse_shapes(args.shapes)
    if args.exportJson:  # before any model is loaded or run, not after
        check_not_input(args.exportJson, *args.onnx, *args.engine, args.checkpoint, args.inputs, flag="--exportJson")
        check_writable_file(args.exportJson)
    runners = []
    if args.checkpoint:
        from trt_qat.runners.torch_runner import torch_runner_from_checkpoint

        runners.append(torch_runner_from_checkpoint(args.checkpoint, family=args.model_family)[0])
    for i, path in enumerate(args.onnx):
        runners.append(OnnxrtRunner(path, providers=args.providers, intra_op_threads=args.threads,
                                    name=f"ort:{i}" if len(args.onnx) > 1 else "ort"))
    for i, path in enumerate(args.engine):
        from trt_qat.runners.trt import TrtRunner

        runners.append(TrtRunner(path, name=f"trt:{i}" if len(args.engine) > 1 else "trt"))
    if len(runners) < 2:
        raise TrtQatError("give at least two models to compare: --checkpoint A.pt --onnx A.onnx, "
                          "--onnx A.onnx --engine A.engine, or --onnx A.onnx --onnx B.onnx")
    shaped = next(r for r in runners if r.backend != "torch")  # ONNX/engine runners declare input shapes
    with shaped:
        if args.inputs:
            feeds = [load_npz_feed(args.inputs, shaped.input_names)]
        else:
            feeds = [make_feed(shaped, batch=args.batch, shapes=shapes, seed=args.seed + k, count=args.num_inputs)
                     for k in range(args.num_inputs)]
        report = compare_runners(runners, feeds, {"cosine": args.cosine, "max_abs": args.max_abs,
                                                  "mean_abs": args.mean_abs})
    print(format_report(report))
    if args.exportJson:
        atomic_write_json(args.exportJson, report)
        LOG.info("wrote %s", args.exportJson)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
