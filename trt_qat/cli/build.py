"""`trt-qat build`: the command line over :mod:`trt_qat.trt.build`."""
from __future__ import annotations

import argparse

from trt_qat.cli.args import ArgumentParser, cli_main
from trt_qat.errors import setup_logging
from trt_qat.trt.build import build_engine
from trt_qat.trt.plan import PRECISIONS, SPARSITY_MODES


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m trt_qat.build_engine",
        description="Build a TensorRT engine from a (Q/DQ) ONNX. Flags follow trtexec's names.")
    p.add_argument("--onnx", required=True, help="the ONNX model (with Q/DQ for --precision int8)")
    p.add_argument("--saveEngine", default=None,
                   help="engine path (default: engines/<model>_<precision>_trt<ver>_<gpu>.engine); "
                        "metadata goes to <engine>.json")
    p.add_argument("--precision", default="int8", choices=PRECISIONS,
                   help="int8 needs Q/DQ in the ONNX; fp16/fp32 need an ONNX without Q/DQ (default: int8)")
    p.add_argument("--no-fp16", dest="fp16_fallback", action="store_false",
                   help="int8: keep the layers Q/DQ leaves unquantized in FP32 instead of FP16")
    p.add_argument("--minShapes", default=None, help="min profile shapes, e.g. images:1x3x640x640")
    p.add_argument("--optShapes", default=None, help="opt profile shapes, e.g. images:8x3x640x640")
    p.add_argument("--maxShapes", default=None, help="max profile shapes, e.g. images:16x3x640x640")
    p.add_argument("--batch", default=None, metavar="MIN:OPT:MAX",
                   help="dynamic batch profile for dimension 0 of every input, e.g. 1:8:16")
    p.add_argument("--workspace", type=int, default=None, metavar="MiB", help="workspace memory pool limit in MiB")
    p.add_argument("--timingCache", default="engines/timing.cache",
                   help="timing cache file, loaded and saved (default: engines/timing.cache; '' disables)")
    p.add_argument("--builderOptimizationLevel", type=int, default=None, metavar="0-5",
                   help="builder optimization level (TensorRT default 3; higher builds slower, may run faster)")
    p.add_argument("--useDLACore", type=int, default=None, metavar="N", help="build for DLA core N (Jetson)")
    p.add_argument("--allowGPUFallback", action="store_true", help="with --useDLACore: run unsupported layers on GPU")
    p.add_argument("--stronglyTyped", action="store_true", default=None,
                   help="strongly typed network (TensorRT >= 10; always on with 11; default from 10.12)")
    p.add_argument("--sparsity", default="disable", choices=SPARSITY_MODES,
                   help="2:4 sparse kernels: disable; enable (BuilderFlag.SPARSE_WEIGHTS, where the weights hold 2:4: "
                        "`trt-qat sparsify`); force (weights rewritten to 2:4 first, speed ceiling only, accuracy "
                        "lost) (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="TensorRT verbose log")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from trt_qat.fileio import check_not_input, check_writable_file
    from trt_qat.trt.metadata import metadata_path

    # the outputs, checked before the (long) build: never one of the inputs, and writable
    outputs = [(args.saveEngine, "--saveEngine"), (args.timingCache or None, "--timingCache")]
    if args.saveEngine:
        outputs.append((metadata_path(args.saveEngine), "--saveEngine (its .json metadata)"))
    for path, flag in outputs:
        if path:
            check_not_input(path, args.onnx, flag=flag)
    if args.saveEngine:
        check_writable_file(args.saveEngine)
    path = build_engine(args.onnx, args.saveEngine, precision=args.precision, fp16_fallback=args.fp16_fallback,
                        workspace_mib=args.workspace, timing_cache=args.timingCache or None,
                        builder_optimization_level=args.builderOptimizationLevel, dla_core=args.useDLACore,
                        allow_gpu_fallback=args.allowGPUFallback, strongly_typed=args.stronglyTyped,
                        verbose=args.verbose, min_shapes=args.minShapes, opt_shapes=args.optShapes,
                        max_shapes=args.maxShapes, batch=args.batch, sparsity=args.sparsity)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
