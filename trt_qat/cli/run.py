"""`trt-qat run`: the command line over :mod:`trt_qat.pipeline`."""
from __future__ import annotations

import time

from trt_qat.cli.args import ArgumentParser, cli_main
from trt_qat.config import load_pipeline_config
from trt_qat.errors import TrtQatError
from trt_qat.fileio import check_not_input, output_lock
from trt_qat.pipeline import run_dirs, run_pipeline


@cli_main
def main(argv=None):
    parser = ArgumentParser(prog="trt-qat run", description="Run the whole pipeline (FP32 eval, PTQ with "
                                     "every calibration method, QAT, ONNX export, ONNX Runtime eval, report).")
    parser.add_argument("--config", required=True, help="YAML pipeline config, e.g. configs/demo.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="override config values, e.g. qat.epochs=1 data.max_val_images=100")
    args = parser.parse_args(argv)
    import yaml

    overrides = {}
    for item in args.set:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise TrtQatError(f"bad --set '{item}'; use SECTION.KEY=VALUE, e.g. qat.epochs=1")
        key, value = item.split("=", 1)
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise TrtQatError(f"--set {item}: the value is not valid YAML ({type(exc).__name__}); quote it, e.g. "
                              f"{key}='\"...\"'") from None
    cfg = load_pipeline_config(args.config, overrides)
    out, calib_dir = run_dirs(cfg)
    if cfg.model.checkpoint:
        for path in (out / "report.json", out / "report.md", out / "report.html", calib_dir / "amax.pt"):
            check_not_input(path, cfg.model.checkpoint, args.config, flag="run.out_dir")
    t0 = time.time()
    with output_lock(out), output_lock(calib_dir):
        report = run_pipeline(cfg)
    print(f"report: {report} (also report.html, report.json) in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
