"""`trt-qat sensitivity`: the command line over :mod:`trt_qat.analysis.sensitivity`, and its sensitivity.md."""
from __future__ import annotations

import re
import time
from pathlib import Path

from trt_qat.analysis.format import format_table, plot_sensitivity
from trt_qat.analysis.metrics import SQNR_CAP_DB, map_metric, sqnr_metric
from trt_qat.analysis.sensitivity import MODES, auto_skip, baseline_scores, layer_sensitivity
from trt_qat.analysis.toggle import layers_in_float, list_layers
from trt_qat.cli.args import ArgumentParser, cli_main
from trt_qat.errors import TrtQatError


def _has_labels(dataset) -> bool:
    return any(len(lb) for lb in getattr(dataset, "labels", []))


def _markdown(summary: dict, results, unit: str) -> str:
    """The run's sensitivity.md: the summary, the ranked table, the chart and the auto-skip list if any."""
    b = summary["baseline"]
    md = ["# Per-layer quantization sensitivity", "",
          f"- checkpoint: `{summary['checkpoint']}`",
          f"- metric: {summary['metric']} ({unit}) on {summary['images']} images of split `{summary['split']}`",
          f"- FP32 (all quantizers bypassed): {b['fp32']:.5g}; all quantized (PTQ): {b['quantized']:.5g}",
          f"- layers evaluated: {summary['layers']}, modes: {', '.join(summary['modes'])}, "
          f"{summary['seconds']:.1f} s", "",
          "leave-one-out: Δ = score with that layer in float - score with all layers quantized. "
          "only-one: Δ = FP32 score - score with only that layer quantized. Positive Δ: the layer hurts."
          + (f" The FP32 SQNR is the {SQNR_CAP_DB:g} dB cap (no noise), so only-one Δ ranks layers but its size "
             "is not a loss." if unit == "dB" else ""), "",
          format_table(results, unit), "", "![sensitivity](sensitivity.png)", ""]
    skip = summary.get("auto_skip")
    if skip:
        md += ["## Auto-skip", "",
               f"target: {skip['target']} {skip['target_unit']}; reached: {skip['reached']}; final score "
               f"{skip['score']:.5g}; {len(skip['skip'])} layers left in float (`skip.yaml`):", ""]
        md += [f"- `{p}`" for p in skip["skip"]] or ["- (none needed)"]
        md.append("")
    return "\n".join(md)


@cli_main
def main(argv=None):
    from trt_qat.cli.args import add_data_args, non_negative_float, regex, resolve_imgsz

    parser = ArgumentParser(
        prog="trt-qat sensitivity",
        description="Per-layer quantization sensitivity of a calibrated checkpoint: a ranked table, a bar chart and "
                    "optionally an automatic skip list for QAT. Writes sensitivity.json/.md/.png (and skip.yaml).")
    parser.add_argument("--checkpoint", required=True, help="calibrated checkpoint (calib/<run>/quantized.pt)")
    add_data_args(parser, default_split="val")
    parser.add_argument("--mode", default="leave-one-out", choices=[*MODES, "both"])
    parser.add_argument("--metric", default="auto", choices=["auto", "map", "sqnr"],
                        help="map: mAP50-95 (needs labels); sqnr: output SQNR vs FP32 in dB; auto: map when the split "
                             "has labels. Default auto")
    parser.add_argument("--sqnr-batches", type=int, default=2, help="batches used by the sqnr metric. Default 2")
    parser.add_argument("--layers", nargs="*", type=regex, default=None, help="regexes: evaluate only matching layers")
    parser.add_argument("--auto-skip", type=non_negative_float, default=None, metavar="TARGET",
                        help="leave the most sensitive layers in float until within TARGET of FP32: mAP50-95 points "
                             "for --metric map (e.g. 0.5), or the SQNR in dB to reach for --metric sqnr (e.g. 30)")
    parser.add_argument("--out", default="reports/sensitivity", help="output directory")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from trt_qat.config import check_device
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.fileio import atomic_write_json, atomic_write_text, check_not_input, output_lock
    from trt_qat.models.adapter import adapter_for_model
    from trt_qat.quant.checkpoint import load_quantized
    from trt_qat.quant.instrument import check_amax

    device = check_device(args.device)
    if args.sqnr_batches < 1:
        raise TrtQatError(f"--sqnr-batches {args.sqnr_batches} must be >= 1")
    if args.auto_skip is not None and args.auto_skip < 0:
        raise TrtQatError(f"--auto-skip {args.auto_skip} must be >= 0")
    out = Path(args.out)
    for name in ("sensitivity.json", "sensitivity.md", "sensitivity.png", "skip.yaml"):
        check_not_input(out / name, args.checkpoint, args.data, flag="--out")
    with output_lock(out):
        model, _ = load_quantized(args.checkpoint)
        if device is not None:
            model.to(device)
        model.eval()
        check_amax(model, "sensitivity analysis")
        names = list_layers(model)
        if args.layers:
            pats = [re.compile(p) for p in args.layers]
            names = [n for n in names if any(p.search(n) for p in pats)]
            if not names:
                raise TrtQatError(f"no quantized layer matches --layers {args.layers}; layer names look like "
                                  f"{list_layers(model)[:3]}")

        metric = args.metric
        max_images = args.max_images
        if metric == "sqnr" and max_images is None:
            max_images = args.sqnr_batches * args.batch_size
        adapter = adapter_for_model(model)
        resolve_imgsz(args, model, adapter=adapter)
        dataset = adapter.dataset(args.data, args.split, imgsz=args.imgsz, max_images=max_images)
        adapter.check_dataset(model, dataset, f"--data {args.data}")
        if metric == "auto":
            metric = "map" if _has_labels(dataset) else "sqnr"
        if metric == "map":
            if not _has_labels(dataset):
                raise TrtQatError(f"split '{args.split}' has no labels; use --metric sqnr (or a labelled split)")
            metric_fn = map_metric(dataset, batch_size=args.batch_size, max_images=max_images, device=args.device)
            unit, images = "mAP50-95", len(dataset)
        else:
            loader = build_dataloader(dataset, batch_size=args.batch_size)
            batches = [imgs for (imgs, _, _), _ in zip(loader, range(args.sqnr_batches))]
            with layers_in_float(model):
                metric_fn = sqnr_metric(model, batches, dim=-1)
            unit, images = "dB", sum(len(b) for b in batches)

        start = time.perf_counter()
        base = baseline_scores(model, metric_fn)
        results = layer_sensitivity(model, metric_fn, args.mode, layers=names, baseline=base)
        summary = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split, "metric": metric,
                   "unit": unit, "images": images, "modes": list(MODES) if args.mode == "both" else [args.mode],
                   "layers": len(names), "baseline": base}
        skip_note = ""
        if args.auto_skip is not None:
            ranking = [r for r in results if r["mode"] == summary["modes"][0]]
            if metric == "map":   # points -> mAP units; gap to the FP32 mAP
                fp32, target, t_unit = base["fp32"], args.auto_skip / 100.0, "mAP50-95 points below FP32"
            else:                 # reach an SQNR of TARGET dB
                fp32, target, t_unit = args.auto_skip, 0.0, "dB SQNR to reach"
            skip = auto_skip(model, metric_fn, fp32, target, ranking, restore=True)
            last = auto_skip.last
            summary["auto_skip"] = {"target": args.auto_skip, "target_unit": t_unit, "skip": skip,
                                    "reached": last["reached"], "score": last["score"], "steps": last["steps"]}
            import yaml

            text = ("# written by `trt-qat sensitivity --auto-skip`: layers to keep in float during QAT\n"
                    + yaml.safe_dump({"quant": {"skip": skip}}, sort_keys=False))
            atomic_write_text(out / "skip.yaml", text)
            reached = "reached" if last["reached"] else "NOT reached"
            skip_note = f"; auto-skip: {len(skip)} layers in float ({reached}) -> {out / 'skip.yaml'}"
        summary["seconds"] = time.perf_counter() - start
        atomic_write_json(out / "sensitivity.json", {**summary, "results": results})
        plot_sensitivity(results, out / "sensitivity.png", unit=unit)
        atomic_write_text(out / "sensitivity.md", _markdown(summary, results, unit))
        top = results[0]
        print(f"sensitivity: {len(names)} layers ({args.mode}, {metric}) in {summary['seconds']:.1f}s; PTQ "
              f"{base['quantized']:.4g} vs FP32 {base['fp32']:.4g} {unit}; most sensitive: {top['layer']} "
              f"(Δ {top['delta']:+.4g}){skip_note} -> {out / 'sensitivity.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
