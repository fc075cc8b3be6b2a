"""Distillation ablation: best PTQ, QAT with labels, distillation QAT with labels, and label-free distillation QAT,
from one pipeline run, in ONNX Runtime (the INT8 reference executor), with the delta to FP32.

    python benchmarks/distill_ablation.py                       # the demo (configs/demo.yaml)
    python benchmarks/distill_ablation.py --mode feature --weight 1 --json out.json

Every QAT variant starts from the same best PTQ model. The distillation runs use the FP32 model as the frozen
teacher (:mod:`trt_qat.train.distill`). "with labels" uses the same steps and learning rate as plain QAT; the
label-free run reads the train split's images as bare images (no label file is opened) and picks its best epoch by
the distillation loss on held-out images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ablation_rows(report: dict) -> list:
    """``[(variant, ORT mAP50, ORT mAP50-95, delta to FP32 in points)]`` from a pipeline report."""
    rows = [r for r in report["rows"] if r["backend"] == "onnxruntime-cpu"]
    fp32 = next(r["map50_95"] for r in rows if r["variant"] == "FP32")
    return [(r["variant"], r["map50"], r["map50_95"], 100 * (r["map50_95"] - fp32)) for r in rows]


def format_table(rows: list) -> str:
    lines = ["| variant (ONNX Runtime, Q/DQ INT8) | mAP50 | mAP50-95 | Δ mAP50-95 vs FP32 (points) |",
             "|---|---|---|---|"]
    lines += [f"| {v} | {m50:.4f} | {m:.4f} | {d:+.2f} |" for v, m50, m, d in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--mode", default="both", choices=("feature", "output", "both"))
    parser.add_argument("--weight", type=float, default=1.0, help="distillation weight next to the detection loss")
    parser.add_argument("--name", default="distill_ablation", help="run name (reports/<name>, calib/<name>)")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="more config overrides")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the config's paths (datasets/, weights/, reports/) are relative to the repository
    sys.path.insert(0, str(ROOT))
    from trt_qat.cli.run import main as run_main

    overrides = [f"qat.distill={{mode: {args.mode}, weight: {args.weight}, label_free: true}}", f"run.name={args.name}",
                 "run.sensitivity=false", *args.set]
    code = run_main(["--config", args.config, "--set", *overrides])
    if code:
        return code
    report = json.loads((ROOT / "reports" / args.name / "report.json").read_text())
    rows = ablation_rows(report)
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(("variant", "map50", "map50_95", "delta_pts"), r))
                                               for r in rows], indent=2) + "\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
