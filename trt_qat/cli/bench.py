"""`trt-qat bench`: the command line over :mod:`trt_qat.measure.benchmark`."""
from __future__ import annotations

import argparse
from pathlib import Path

from trt_qat.cli.args import ArgumentParser, cli_main, non_negative_float, positive_int
from trt_qat.errors import LOG, TrtQatError, setup_logging
from trt_qat.fileio import check_not_input, check_writable_file
from trt_qat.measure.benchmark import benchmark, check_timing, format_summary, make_feed, write_results


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m trt_qat.benchmark",
                                description="Latency benchmark with trtexec's statistics and names.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine", help="a TensorRT engine (backend trt)")
    src.add_argument("--onnx", help="an ONNX model (backend ort)")
    p.add_argument("--backend", choices=("trt", "ort"), default=None,
                   help="trt for --engine, ort (ONNX Runtime) for --onnx (default: from the input)")
    p.add_argument("--providers", default="cpu",
                   help="ONNX Runtime execution providers, comma-separated: cpu, cuda, trt (default: cpu)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch size for a dynamic batch dimension (default 1)")
    p.add_argument("--shapes", default=None, help="input shapes, e.g. images:8x3x640x640 (overrides --batch)")
    p.add_argument("--warmUp", type=non_negative_float, default=200, metavar="MS",
                   help="warm-up time in ms, finite, at most one day (default 200)")
    p.add_argument("--duration", type=non_negative_float, default=3, metavar="S",
                   help="minimum measured time in s, finite, at most one day (default 3)")
    p.add_argument("--iterations", type=positive_int, default=10,
                   help="minimum number of measured queries (default 10); the run lasts until both --iterations "
                        "and --duration are reached, so a huge value runs that many queries however long it takes")
    p.add_argument("--useCudaGraph", action="store_true", help="TensorRT: replay the inference as a CUDA graph")
    p.add_argument("--noDataTransfers", action="store_true",
                   help="TensorRT: skip host/device copies, time the engine on device-resident inputs")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--exportJson", default=None, metavar="FILE",
                   help="write the results as JSON (checked writable before the benchmark runs)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _source_info(args) -> dict:
    if args.engine:
        from trt_qat.trt.metadata import read_engine_metadata

        meta = read_engine_metadata(args.engine) or {}
        return {"model": str(args.engine), "precision": meta.get("precision"), "trt_version": meta.get("trt_version"),
                "gpu_name": meta.get("gpu_name"), "engine_bytes": Path(args.engine).stat().st_size}
    from trt_qat.onnx.io import has_qdq, load_onnx

    model = load_onnx(args.onnx)
    precision = "int8" if has_qdq(model) else "fp32"
    if any(i.data_type == 10 for i in model.graph.initializer):
        precision = "int8+fp16" if precision == "int8" else "fp16"
    return {"model": str(args.onnx), "precision": precision}


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    backend = args.backend or ("trt" if args.engine else "ort")
    if backend == "trt" and not args.engine:
        raise TrtQatError("--backend trt needs --engine; build one with `python -m trt_qat.build_engine`")
    if backend == "ort" and not args.onnx:
        raise TrtQatError("--backend ort needs --onnx (ONNX Runtime cannot run a TensorRT engine file)")
    if args.batch is not None and args.batch < 1:
        raise TrtQatError(f"--batch must be >= 1, got {args.batch}")
    check_timing(args.warmUp, args.duration, args.iterations)
    if args.exportJson:  # before the benchmark, not after it
        check_not_input(args.exportJson, args.onnx, args.engine, flag="--exportJson")
        check_writable_file(args.exportJson)
    from trt_qat.trt.profile import parse_shapes

    shapes = parse_shapes(args.shapes)
    info = _source_info(args)
    if backend == "trt":
        from trt_qat.runners.trt import TrtRunner

        runner = TrtRunner(args.engine, cuda_graph=args.useCudaGraph)
    else:
        from trt_qat.runners.onnxrt import OnnxrtRunner

        runner = OnnxrtRunner(args.onnx, providers=args.providers, intra_op_threads=args.threads)
    with runner:
        feed = make_feed(runner, batch=args.batch, shapes=shapes)
        result = benchmark(runner, feed, warmup_ms=args.warmUp, duration_s=args.duration, iterations=args.iterations,
                           no_data_transfers=args.noDataTransfers, cuda_graph=args.useCudaGraph)
        if backend == "ort":
            info["providers"] = runner.active_providers
            info["threads"] = args.threads
    print(format_summary(result))
    if args.exportJson:
        write_results(args.exportJson, result, extra=info)
        LOG.info("wrote %s", args.exportJson)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
