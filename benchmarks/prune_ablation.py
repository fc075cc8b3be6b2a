"""Pruning and 2:4 ablation: FP32, pruned to 80% / 60% / 40% of its MACs (each fine-tuned with distillation from the
unpruned model, then calibrated and QAT-trained), and 2:4 + QAT, in one table from one run.

    python benchmarks/prune_ablation.py                                   # the demo (configs/demo.yaml), full size
    python benchmarks/prune_ablation.py --epochs 1 --max-steps 2 --latency-rounds 1     # a smoke run

Per variant: mAP50 and mAP50-95 in ONNX Runtime (CPU; FP32 ONNX and the QAT Q/DQ ONNX), params, GMACs at the
latency size, the lint of the Q/DQ ONNX (scale mismatches, requantize chains, reformat sites; 2:4-ready share of
the eligible conv MACs), and the ONNX Runtime CPU latency of the FP32 ONNX at batch 1 and ``--latency-imgsz``
(640 by default: at the demo's 128 px per-op overhead hides the gain), measured interleaved: every round times each
model in turn, and the median over rounds is reported, so that a busy machine slows every model alike.
2:4 gives no speed in ONNX Runtime (no sparse kernels); its latency is shown to say so, not as a gain.

Channels are rounded to multiples of 16 here (``--round-to``): on a 2-core x86 CPU, yolo-n pruned to 57% of its MACs
ran 36% faster than unpruned at 640x640 with 16-multiples, but only 18% faster with 8-multiples (ORT 1.31, 2 threads,
interleaved; untrained weights, latency does not depend on them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interleaved_latency(paths: dict, imgsz: int, rounds: int = 5, iters: int = 10, threads: int | None = None,
                        warmup: int = 2) -> dict:
    """``{name: median ms}`` of batch-1 ``imgsz`` inference of each ONNX in ``paths``, timed round-robin."""
    import numpy as np

    from trt_qat.runners.onnxrt import OnnxrtRunner

    runners = {name: OnnxrtRunner(path, intra_op_threads=threads) for name, path in paths.items()}
    times = {name: [] for name in paths}
    feed = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    try:
        for r in runners.values():
            r.activate()
            for _ in range(warmup):
                r.infer({r.input_names[0]: feed})
        for _ in range(max(int(rounds), 1)):
            for key, r in runners.items():
                name = r.input_names[0]
                t0 = time.perf_counter()
                for _ in range(max(int(iters), 1)):
                    r.infer({name: feed})
                times[key].append(1e3 * (time.perf_counter() - t0) / max(int(iters), 1))
    finally:
        for r in runners.values():
            r.deactivate()
    return {k: statistics.median(v) for k, v in times.items()}


def format_table(rows: list) -> str:
    lines = ["| variant | mAP50-95 FP32 (ORT) | mAP50-95 QAT (ORT) | Δ QAT vs FP32 (points) | params (M) | GMACs "
             "| of FP32 MACs | ORT CPU FP32 latency (ms) | vs unpruned | lint QAT (mismatch/chain/reformat) "
             "| 2:4-ready |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = rows[0]
    for r in rows:
        qat = "—" if r.get("qat_map50_95") is None else f"{r['qat_map50_95']:.4f}"
        delta = "—" if r.get("qat_map50_95") is None else f"{100 * (r['qat_map50_95'] - base['fp32_map50_95']):+.2f}"
        lint = r.get("lint") or {}
        lint_txt = "—" if not lint else (f"{lint['scale_mismatches']}/{lint['requantize_chains']}/"
                                         f"{lint['reformat_sites']}")
        ready = (lint.get("sparsity") or {}).get("ready_fraction_of_eligible")
        speed = f"{100 * (1 - r['latency_ms'] / base['latency_ms']):+.0f}% faster" if r is not base else "—"
        if r.get("kind") == "sparsity":  # same dense work: any difference is noise
            speed = "none expected (no 2:4 kernels in ORT)"
        lines.append(f"| {r['variant']} | {r['fp32_map50_95']:.4f} | {qat} | {delta} | {r['params'] / 1e6:.2f} | "
                     f"{r['gmacs']:.3f} | {100 * r['gmacs'] / base['gmacs']:.0f}% | {r['latency_ms']:.2f} | {speed} | "
                     f"{lint_txt} | "
                     f"{'—' if ready is None else f'{100 * ready:.0f}% of eligible MACs'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    parser.add_argument("--targets", nargs="*", type=float, default=[0.8, 0.6, 0.4],
                        help="MAC fractions kept (none: only the 2:4 variant)")
    parser.add_argument("--round-to", type=int, default=16,
                        help="channel multiple (default 16: ONNX Runtime's CPU kernels run 16-multiples much faster "
                             "than 8-multiples; both suit INT8)")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs after pruning / 2:4")
    parser.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default: the config's)")
    parser.add_argument("--epochs", type=int, default=None, help="set both fine-tuning and QAT epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
    parser.add_argument("--calib-method", default="percentile", help="calibration method (the demo's best PTQ)")
    parser.add_argument("--min-channels", type=int, default=256, help="2:4 eligibility threshold")
    parser.add_argument("--no-sparsity", action="store_true", help="leave out the 2:4 variant")
    parser.add_argument("--latency-imgsz", type=int, default=640)
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--latency-iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT threads (default: the config's)")
    parser.add_argument("--name", default="prune_ablation", help="work directory reports/<name>")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the config's paths (datasets/, weights/, reports/) are relative to the repository
    sys.path.insert(0, str(ROOT))
    import torch
    import yaml

    from trt_qat.config import load_pipeline_config
    from trt_qat.errors import setup_logging
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.models.adapter import load_fp32
    from trt_qat.onnx.export import export_onnx
    from trt_qat.prune.variants import ORT_NO_SPARSE_NOTE, run_variant
    from trt_qat.runners.onnxrt import OnnxrtRunner
    from trt_qat.runners.torch_runner import TorchRunner

    setup_logging()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    cfg = load_pipeline_config(args.config, overrides)
    ft = args.epochs if args.epochs is not None else args.finetune_epochs
    qat_epochs = args.epochs if args.epochs is not None else (args.qat_epochs or cfg.qat.epochs)
    threads = args.threads or cfg.run.threads
    if threads:
        torch.set_num_threads(threads)
    cfg = dataclasses.replace(
        cfg, qat=dataclasses.replace(cfg.qat, epochs=qat_epochs, max_steps_per_epoch=args.max_steps),
        run=dataclasses.replace(cfg.run, threads=threads),
        sparsity=dataclasses.replace(cfg.sparsity, min_channels=args.min_channels, finetune_epochs=ft))
    data_yaml = Path(cfg.data.data)
    if cfg.data.generate and not data_yaml.is_file():
        from trt_qat.data.digits_det import generate_digits_det

        data_yaml = generate_digits_det(data_yaml.parent)
    fp32, adapter = load_fp32(cfg.model.checkpoint, cfg.model.family)
    fp32.eval()
    if cfg.data.imgsz is None:  # (as the pipeline: the checkpoint's training size)
        cfg.data.imgsz = int(getattr(fp32, "trt_qat_imgsz", None) or 128)
    imgsz, bs = cfg.data.imgsz, cfg.data.batch_size
    val = adapter.dataset(data_yaml, cfg.data.val_split, imgsz=imgsz, max_images=cfg.data.max_val_images)
    calib_ds = adapter.dataset(data_yaml, cfg.data.calib_split, imgsz=imgsz)
    train = adapter.dataset(data_yaml, cfg.data.train_split, imgsz=imgsz, max_images=cfg.data.max_train_images)
    work = Path(cfg.run.out_dir) / args.name

    def ev(model_or_runner, name):
        runner = model_or_runner if hasattr(model_or_runner, "infer") else TorchRunner(
            model_or_runner, input_name=adapter.input_names[0], output_names=adapter.output_names, name=name)
        return evaluate(runner, val, batch_size=bs, desc=f"eval {name}", adapter=adapter)

    def export_640(model, name):
        return export_onnx(model.eval(), adapter.sample_input(args.latency_imgsz), work / f"{name}_{args.latency_imgsz}"
                           ".onnx", opset=cfg.export.opset, dynamic_batch=False, input_names=adapter.input_names,
                           output_names=adapter.output_names)

    def gmacs(path):
        from trt_qat.onnx.lint import lint_onnx

        return lint_onnx(path).stats.get("total_macs", 0) / 1e9

    t_start = time.time()
    base_onnx = export_onnx(fp32, adapter.sample_input(imgsz), work / "fp32.onnx", opset=cfg.export.opset,
                            input_names=adapter.input_names, output_names=adapter.output_names)
    with OnnxrtRunner(base_onnx) as runner:
        base = ev(runner, "FP32 ort")
    lat_paths = {"FP32": export_640(fp32, "fp32")}
    rows = [{"variant": "FP32", "fp32_map50_95": base["map50_95"], "qat_map50_95": None,
             "params": sum(p.numel() for p in fp32.parameters()), "gmacs": gmacs(lat_paths["FP32"])}]
    # (the target is an upper bound: channel counts rounded to --round-to land at or below it, the column
    # "of FP32 MACs" says where)
    plans = [(f"pruned, target {round(100 * t)}% MACs", "prune", t) for t in args.targets]
    if not args.no_sparsity:
        plans.append(("2:4", "sparsity", None))
    for label, kind, target in plans:
        vcfg = cfg if target is None else dataclasses.replace(
            cfg, prune=dataclasses.replace(cfg.prune, target_macs=target, finetune_epochs=ft, round_to=args.round_to))
        res = run_variant(vcfg, label, kind, adapter, fp32, data_yaml, calib_ds, train, work, ev,
                          lambda path, threads: {}, args.calib_method)
        info = res["info"]
        lat_paths[label] = export_640(res["model"], "".join(c if c.isalnum() else "_" for c in label))
        rows.append({"variant": label, "kind": kind, "fp32_map50_95": info["fp32"]["ort_map50_95"],
                     "qat_map50_95": info["qat"]["ort_map50_95"], "params": info["params"],
                     "gmacs": gmacs(lat_paths[label]), "lint": info["lint_qat"], "macs_ratio": (info.get("prune") or
                                                                                               {}).get("macs_ratio")})
    latency = interleaved_latency(lat_paths, args.latency_imgsz, args.latency_rounds, args.latency_iters, threads)
    for r in rows:
        r["latency_ms"] = latency[r["variant"]]
    print(f"\nONNX Runtime CPU, batch 1; latency of the FP32 ONNX at {args.latency_imgsz}x{args.latency_imgsz}, "
          f"{threads or 'default'} threads, median of {args.latency_rounds} interleaved rounds; mAP on the val split "
          f"at {imgsz}px; fine-tune {ft} epochs, QAT {qat_epochs} epochs ({time.time() - t_start:.0f}s)\n")
    print(format_table(rows))
    print(f"\n{ORT_NO_SPARSE_NOTE}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
