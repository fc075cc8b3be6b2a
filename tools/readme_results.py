"""README's demo results, generated from ``reports/demo/report.json`` so that they cannot drift from what
``make demo`` prints.

    python tools/readme_results.py --check   # exit 1 (with a diff) when README's block differs from report.json
    python tools/readme_results.py --write   # rewrite the block between the markers from report.json

The block sits between ``<!-- demo-results:start -->`` and ``<!-- demo-results:end -->`` in README.md. The second
demo's block (``make demo-yolov8n``) is ``--block yolov8n-digits --report reports/yolov8n-digits/report.json``.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def markers(block: str = "demo") -> tuple:
    """The start and end markers of README's results block ``block``."""
    return f"<!-- {block}-results:start -->", f"<!-- {block}-results:end -->"


BACKENDS = {"torch": "PyTorch", "onnxruntime-cpu": "ONNX Runtime CPU"}


def _pts(value: float) -> str:
    text = f"{100 * value:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text.replace("-", "−")


def results_block(report: dict) -> str:
    """The Markdown block (table and the agreement/lint lines) for a demo ``report.json``."""
    meta, rows = report["meta"], report["rows"]
    summary, cfg = meta["summary"], meta["config"]
    best = summary["best_ptq"]["method"]
    fp32 = summary["fp32_map50_95"]
    out = ["| variant | backend | mAP50 | mAP50-95 | Δ mAP50-95 vs FP32 (points) |", "|---|---|---|---|---|"]
    for row in rows:
        variant, backend = row["variant"], row["backend"]
        label = variant.replace("-", " ")
        if variant.startswith("PTQ-") and variant[4:] == best and backend == "torch":
            label = f"PTQ {best}" + (f" {cfg['calib']['percentile']:g}" if best == "percentile" else "") + " (best PTQ)"
        elif variant == "QAT" and backend == "torch":
            label = f"QAT ({cfg['qat']['epochs']} epochs from PTQ {best})"
        where = BACKENDS.get(backend, backend)
        if backend == "torch" and variant != "FP32":
            where += " fake-quant"
        elif backend != "torch" and variant != "FP32":
            where += ", Q/DQ INT8"
        delta = "—" if (variant, backend) == ("FP32", "torch") else _pts(row["map50_95"] - fp32)
        cells = [label, where, f"{row['map50']:.4f}", f"{row['map50_95']:.4f}", delta]
        if (variant, backend) == ("QAT", "onnxruntime-cpu"):
            cells = [f"**{c}**" for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    agree, lint = summary["torch_vs_ort"], summary["lint"]
    out += ["",
            f"- PyTorch fake-quant and ONNX Runtime on the same QAT model: {agree['map50_95_diff_pts']:.2f} points of "
            f"mAP50-95 apart; cosine similarity of the raw (pre-NMS) head outputs ≥ "
            f"{int(agree['cosine_min'] * 1e5) / 1e5:.5f} on {agree['batches']} val batches.",
            f"- `trt-qat lint` on the QAT Q/DQ ONNX: {lint['int8_layers']} of {lint['weighted_layers']} convolutions "
            f"INT8 ({100 * lint['int8_coverage']:.0f}% of MACs), {lint['scale_mismatches']} scale mismatches, "
            f"{lint['requantize_chains']} requantize chains, {lint['reformat_sites']} predicted reformat sites."]
    if lint.get("skipped_float_layers"):
        out[-1] = out[-1][:-1] + (f"; {lint['skipped_float_layers']} layer(s) kept in float on purpose by the model "
                                  f"family ({', '.join(f['node'] for f in lint['float_layers'] if f.get('skipped'))}), "
                                  f"{100 * lint['int8_coverage_excluding_skipped']:.0f}% of the other MACs INT8.")
    return "\n".join(out)


def split_readme(text: str, block: str = "demo") -> tuple:
    """``(before, block, after)`` of README text around the markers of ``block``."""
    start, end = markers(block)
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    before, rest = text.split(start, 1)
    block, after = rest.split(end, 1)
    return before, block.strip("\n"), after


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default=str(ROOT / "reports" / "demo" / "report.json"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--block", default="demo", help="which results block (demo, yolov8n-digits)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    report_path, readme = Path(args.report), Path(args.readme)
    if not report_path.is_file():
        print(f"{report_path} does not exist; run `make demo` first", file=sys.stderr)
        return 2
    want = results_block(json.loads(report_path.read_text(encoding="utf-8")))
    before, have, after = split_readme(readme.read_text(encoding="utf-8"), args.block)
    start, end = markers(args.block)
    if args.write:
        readme.write_text(f"{before}{start}\n{want}\n{end}{after}", encoding="utf-8")
        return 0
    if have == want:
        print(f"README results match {report_path}")
        return 0
    sys.stdout.writelines(difflib.unified_diff(have.splitlines(True), want.splitlines(True), "README.md",
                                               str(report_path)))
    print(f"\nREADME results differ from {report_path}; run `python tools/readme_results.py --write`",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
