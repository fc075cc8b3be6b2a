"""Do the TensorRT placement rules cost accuracy, and what do they buy in the graph?

Runs the demo pipeline twice in one process with the same FP32 checkpoint, data, calibration method and QAT
schedule: once with ``quant.rules: true`` and once with ``false`` (naive placement, as pytorch-quantization's
``quant_modules.initialize()`` gives). Prints PTQ/QAT mAP (PyTorch and ONNX Runtime) and the linter's findings
for both exported QAT graphs, then the difference in points.

    python benchmarks/rules_ablation.py --config configs/demo.yaml [--method percentile] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trt_qat.config import load_pipeline_config  # noqa: E402
from trt_qat.errors import setup_logging  # noqa: E402
from trt_qat.pipeline import run_pipeline  # noqa: E402


def run(config: str, method: str | None, epochs: int | None) -> dict:
    results = {}
    for rules in (True, False):
        name = "ablation_rules" if rules else "ablation_naive"
        overrides = {"quant.rules": rules, "run.name": name, "run.sensitivity": False}
        if method:
            overrides["run.calib_methods"] = [method]
        if epochs:
            overrides["qat.epochs"] = epochs
        cfg = load_pipeline_config(config, overrides)
        report_md = run_pipeline(cfg)
        data = json.loads(Path(report_md).with_name("report.json").read_text())
        rows = {(r["variant"], r["backend"]): r for r in data["rows"]}
        s = data["meta"]["summary"]
        lint = s.get("lint") or {}
        results[name] = {
            "ptq_torch": s["best_ptq"]["map50_95"],
            "qat_torch": s["qat_torch_map50_95"],
            "qat_ort": s["qat_ort_map50_95"],
            "fp32": s["fp32_map50_95"],
            "ort_latency_ms": rows.get(("QAT", "onnxruntime-cpu"), {}).get("latency_ms_p50"),
            "scale_mismatches": lint.get("scale_mismatches"),
            "requantize_chains": lint.get("requantize_chains"),
            "reformat_sites": lint.get("reformat_sites"),
            "int8_coverage": lint.get("int8_coverage"),
            "findings": lint.get("finding_counts"),
        }
    return results


def main(argv=None):
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--method", default=None, help="one calibration method for both runs (default: the config's)")
    p.add_argument("--epochs", type=int, default=None, help="QAT epochs (default: the config's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(args.config, args.method, args.epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    r, n = res["ablation_rules"], res["ablation_naive"]
    keys = ["fp32", "ptq_torch", "qat_torch", "qat_ort", "scale_mismatches", "requantize_chains", "reformat_sites",
            "int8_coverage", "ort_latency_ms"]
    print(f"\n{'metric':<20} {'rules':>12} {'naive':>12}")
    for k in keys:
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
        print(f"{k:<20} {fmt(r[k]):>12} {fmt(n[k]):>12}")
    print(f"naive findings: {n['findings']}")
    print(f"QAT mAP50-95 (ORT) rules - naive: {100 * (r['qat_ort'] - n['qat_ort']):+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
