"""`trt-qat lint`: the command line over :mod:`trt_qat.onnx.lint`."""
from __future__ import annotations

import sys
from pathlib import Path

from trt_qat.cli.args import ArgumentParser, cli_main, positive_int
from trt_qat.errors import LOG
from trt_qat.fileio import atomic_write_json, check_not_input, check_writable_file
from trt_qat.onnx.lint import lint_onnx


@cli_main
def main(argv=None):
    """``trt-qat lint model.onnx [--json out.json] [--strict] [--skip REGEX ...] [--all]``."""
    from trt_qat.cli.args import regex

    parser = ArgumentParser(
        prog="trt-qat lint",
        description="Lint the Q/DQ placement of an ONNX model for TensorRT INT8 (any exporter, no config).")
    parser.add_argument("onnx", help="path of the Q/DQ ONNX model")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON (atomically)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when there are errors")
    parser.add_argument("--skip", nargs="+", type=regex, default=[], metavar="REGEX",
                        help="node-name regexes of layers left in float on purpose (excluded from coverage)")
    parser.add_argument("--all", action="store_true", help="also list the INT8-eligible layers")
    parser.add_argument("--sparsity", action="store_true",
                        help="list every conv's 2:4 state (shown anyway when some conv holds 2:4)")
    parser.add_argument("--min-channels", type=positive_int, default=256, metavar="N",
                        help="2:4: convs with fewer input or output channels run densely (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.json:  # before the work: an unwritable path, or the input itself, is refused up front
        check_not_input(args.json, args.onnx, flag="--json")
        check_writable_file(args.json)
    report = lint_onnx(args.onnx, skip_nodes=args.skip, sparsity_min_channels=args.min_channels)
    print(report.format_table(show_int8=args.all, show_sparsity=True if args.sparsity else None))
    if args.json:
        atomic_write_json(Path(args.json), report.to_dict())
        LOG.info("wrote %s", args.json)
    if args.strict and report.errors:
        print(f"trt_qat: lint: {len(report.errors)} error(s) (--strict)", file=sys.stderr)
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
