"""`trt-qat report`: the command line over :mod:`trt_qat.report.write`."""
from __future__ import annotations

from pathlib import Path

from trt_qat.cli.args import ArgumentParser, cli_main
from trt_qat.errors import TrtQatError
from trt_qat.fileio import check_not_input
from trt_qat.report.write import load_rows, merge_rows, report_files, write_report


@cli_main
def main(argv=None):
    parser = ArgumentParser(prog="trt-qat report", description="Merge eval/bench JSON files (rows with "
                                     "variant/backend/precision and metrics) into report.md/json/html + plots.")
    parser.add_argument("inputs", nargs="+", help="JSON files: report.json, eval or bench results")
    parser.add_argument("--out", default="reports/merged",
                        help="output directory (its report.md/json/html and plots must not be one of the inputs)")
    parser.add_argument("--title", default="trt_qat report")
    args = parser.parse_args(argv)
    rows = []
    for p in args.inputs:
        path = Path(p)
        if not path.is_file():
            raise TrtQatError(f"report input '{path}' does not exist; check the path")
        rows += load_rows(path)
    for output in report_files(args.out):
        check_not_input(output, *args.inputs, flag="a report file in --out")
    md = write_report(merge_rows(rows), args.out, meta={"inputs": args.inputs}, title=args.title)
    print(f"report: {md} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
