"""`trt-qat run --config configs/demo.yaml`: the whole pipeline in one command.

1. FP32 evaluation (PyTorch);
2. one calibration statistics pass, then amax with each method (max, percentile, mse, entropy) and a PTQ
   evaluation for each;
3. QAT from the best PTQ (scales frozen), keeping the best epoch;
4. export of FP32 and Q/DQ ONNX (best PTQ and QAT);
5. evaluation of the ONNX files in ONNX Runtime on the CPU, PyTorch/ONNX Runtime agreement, ORT latency;
6. the report (Markdown, JSON, HTML, plots) under ``reports/<run>/``.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import platform
import time
from pathlib import Path

import torch

from trt_qat.config import PipelineConfig
from trt_qat.errors import LOG, TrtQatError

__all__ = ["run_pipeline", "output_agreement"]


def _versions() -> dict:
    import onnx
    import onnxruntime
    import pytorch_quantization

    from trt_qat import __version__

    return {"trt_qat": __version__, "torch": torch.__version__,
            "pytorch_quantization": pytorch_quantization.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads()}


def output_agreement(model, onnx_path, dataset, adapter, batches: int = 4, batch_size: int = 8) -> dict:
    """Cosine similarity and max-abs difference between PyTorch and ONNX Runtime on the raw (pre-NMS) outputs of
    the first ``batches`` batches of ``dataset`` (:func:`~trt_qat.measure.compare.compare_runners`)."""
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.measure.compare import compare_runners
    from trt_qat.runners.onnxrt import OnnxrtRunner
    from trt_qat.runners.torch_runner import TorchRunner

    loader = build_dataloader(dataset, batch_size=batch_size)
    feeds = ({adapter.input_names[0]: imgs.numpy()} for imgs, _, _ in itertools.islice(loader, batches))
    report = compare_runners([TorchRunner(model, input_name=adapter.input_names[0], output_names=adapter.output_names),
                              OnnxrtRunner(onnx_path)], feeds)
    rows = report["pairs"][0]["outputs"]
    return {"cosine_min": float(min(r["cosine"] for r in rows)), "max_abs": float(max(r["max_abs"] for r in rows)),
            "batches": report["n_feeds"]}


def _ort_latency(onnx_path, threads: int | None) -> dict:
    from trt_qat.measure.benchmark import benchmark, make_feed
    from trt_qat.runners.onnxrt import OnnxrtRunner

    with OnnxrtRunner(onnx_path, intra_op_threads=threads) as runner:
        res = benchmark(runner, make_feed(runner, batch=1), warmup_ms=300, duration_s=1.5, iterations=20)
    lat = res["Latency"]
    return {"latency_ms_p50": lat["median"], "latency_ms_p99": lat["p99"], "qps": res["Throughput (qps)"]}


def _size_mb(path) -> float:
    return Path(path).stat().st_size / 1e6


def _state_size_mb(model) -> float:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 1e6


def run_dirs(cfg: PipelineConfig) -> tuple:
    """``(report directory, calibration directory)`` of a run: ``<run.out_dir>/<run.name>``, ``calib/<run.name>``."""
    return Path(cfg.run.out_dir) / cfg.run.name, Path("calib") / cfg.run.name


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run every stage for ``cfg``; returns the path of report.md."""
    from trt_qat.calibration.calibrate import collect_stats, compute_amax, save_amax
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.data.yolo import write_image_list
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.models.adapter import load_fp32
    from trt_qat.onnx.export import export_onnx
    from trt_qat.onnx.lint import lint_onnx
    from trt_qat.quant.checkpoint import save_quantized
    from trt_qat.quant.instrument import quantize, quantizer_summary
    from trt_qat.report.write import write_report
    from trt_qat.runners.onnxrt import OnnxrtRunner
    from trt_qat.runners.torch_runner import TorchRunner
    from trt_qat.train.loop import run_fingerprint
    from trt_qat.train.qat import finetune

    t_start = time.time()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    out, calib_dir = run_dirs(cfg)  # (created by their first write)
    work = out / "artifacts"

    data_yaml = Path(cfg.data.data)
    if cfg.data.generate and not data_yaml.is_file():
        from trt_qat.data.digits_det import generate_digits_det

        LOG.info("generating the digits-det demo dataset in %s", data_yaml.parent)
        data_yaml = generate_digits_det(data_yaml.parent)
    if not cfg.model.checkpoint:
        raise TrtQatError("model.checkpoint is not set; train a baseline with `trt-qat train` and set it in the config")
    fp32, adapter = load_fp32(cfg.model.checkpoint, cfg.model.family)
    held = adapter.model_name(fp32)
    if cfg.model.name and held and held != cfg.model.name:
        raise TrtQatError(f"model.checkpoint '{cfg.model.checkpoint}' holds {held}, but model.name is "
                          f"{cfg.model.name}; set model.name: {held} or point model.checkpoint at a {cfg.model.name}")
    fp32.eval()
    if cfg.data.imgsz is None:  # the size the checkpoint was trained at (Ultralytics' and ours: train_args.imgsz)
        cfg.data.imgsz = int(getattr(fp32, "trt_qat_imgsz", None) or 128)
        LOG.debug("data.imgsz %d (%s)", cfg.data.imgsz,
                 "from the checkpoint" if getattr(fp32, "trt_qat_imgsz", None) else "the default")
    adapter.check_imgsz(fp32, cfg.data.imgsz)
    if cfg.prune.target_macs is not None or cfg.prune.target_params is not None or cfg.sparsity.enabled:
        from trt_qat.prune.variants import check_variants

        check_variants(cfg, fp32)  # (a section that cannot work is refused now, not after the baseline)
    imgsz, bs = cfg.data.imgsz, cfg.data.batch_size
    val = adapter.dataset(data_yaml, cfg.data.val_split, imgsz=imgsz, max_images=cfg.data.max_val_images)
    adapter.check_dataset(fp32, val, f"data.data '{data_yaml}'")
    calib_ds = adapter.dataset(data_yaml, cfg.data.calib_split, imgsz=imgsz)
    train = adapter.dataset(data_yaml, cfg.data.train_split, imgsz=imgsz, max_images=cfg.data.max_train_images)
    write_image_list(calib_ds.image_paths, calib_dir / "calib_images.txt")
    rows, stages = [], {}

    def ev(model_or_runner, name):
        runner = model_or_runner
        if not hasattr(runner, "infer"):
            runner = TorchRunner(model_or_runner, input_name=adapter.input_names[0],
                                 output_names=adapter.output_names, name=name)
        t0 = time.time()
        res = evaluate(runner, val, batch_size=bs, desc=f"eval {name}", adapter=adapter)
        LOG.info("%-22s mAP50 %.4f  mAP50-95 %.4f  (%.0fs)", name, res["map50"], res["map50_95"], time.time() - t0)
        return res

    # 1. FP32
    t0 = time.time()
    r = ev(fp32, "FP32 torch")
    rows.append({"variant": "FP32", "backend": "torch", "precision": "fp32", "batch": bs, **_m(r),
                 "size_mb": _state_size_mb(fp32)})
    stages["fp32_eval_s"] = time.time() - t0

    # 2. PTQ: one statistics pass, every method
    t0 = time.time()
    sample = adapter.sample_input(imgsz)
    quant_cfg = dataclasses.replace(cfg.quant, skip=[*cfg.quant.skip, *adapter.float_skip_patterns(fp32)])
    qmodel = quantize(copy.deepcopy(fp32), quant_cfg, sample_input=sample)
    calib_loader = build_dataloader(calib_ds, batch_size=bs)
    collect_stats(qmodel, calib_loader, num_batches=cfg.calib.num_batches, histogram=True)
    stages["calib_collect_s"] = time.time() - t0
    ptq = {}
    for method in cfg.run.calib_methods:
        t1 = time.time()
        compute_amax(qmodel, method, cfg.calib.percentile)
        stages[f"amax_{method}_s"] = time.time() - t1
        save_amax(qmodel, calib_dir / f"amax_{method}.pt")
        r = ev(qmodel, f"PTQ-{method} torch")
        ptq[method] = r
        rows.append({"variant": f"PTQ-{method}", "backend": "torch", "precision": "int8 (fake-quant)", "batch": bs,
                     **_m(r), "size_mb": _state_size_mb(qmodel)})
    best_method = max(ptq, key=lambda k: ptq[k]["map50_95"])
    compute_amax(qmodel, best_method, cfg.calib.percentile)
    save_quantized(qmodel, work / "ptq_best.pt", extra={"calib_method": best_method})
    save_amax(qmodel, calib_dir / "amax.pt")
    stages["ptq_s"] = time.time() - t0
    ptq_model = copy.deepcopy(qmodel)
    sections, images = [], []
    if cfg.run.sensitivity:
        t0 = time.time()
        from trt_qat.analysis.format import plot_sensitivity, sensitivity_section
        from trt_qat.analysis.metrics import map_metric
        from trt_qat.analysis.sensitivity import layer_sensitivity

        n_img = min(len(val), 64)
        results = layer_sensitivity(ptq_model, map_metric(val, batch_size=bs, max_images=n_img),
                                    mode="leave-one-out")
        images.append(plot_sensitivity(results, out / "sensitivity.png", unit="mAP50-95"))
        heading, text = sensitivity_section(results, unit="mAP50-95")
        sections.append((f"{heading} (leave-one-out on PTQ-{best_method}, {n_img} val images)", text))
        stages["sensitivity_s"] = time.time() - t0

    # 3. QAT from the best PTQ. Reseed: every DataLoader iterator draws from the global RNG, so without this the
    # QAT data order (and result) would depend on how many evaluations ran before it.
    t0 = time.time()
    torch.manual_seed(cfg.run.seed)
    train_loader = build_dataloader(train, batch_size=bs, shuffle=True, workers=cfg.data.workers)
    fingerprint = run_fingerprint([cfg.to_dict(), best_method], fp32)
    qat_result = finetune(qmodel, train_loader, adapter.loss_fn(qmodel), config=cfg.qat,
                          eval_fn=lambda m: ev(m, "QAT (epoch) torch")["map50_95"],
                          checkpoint_dir=work / "qat", fingerprint=fingerprint)
    r = ev(qmodel, "QAT torch")
    rows.append({"variant": "QAT", "backend": "torch", "precision": "int8 (fake-quant)", "batch": bs, **_m(r),
                 "size_mb": _state_size_mb(qmodel), "notes": f"from PTQ-{best_method}"})
    stages["qat_s"] = time.time() - t0
    qat_torch = r
    t0 = time.time()
    distilled = distill_variants(cfg, adapter, ptq_model, fp32, train, data_yaml, work, ev, rows, best_method)
    if distilled:
        stages["distill_qat_s"] = time.time() - t0

    # 4. export
    t0 = time.time()
    onnx_fp32, onnx_ptq, onnx_qat, *onnx_distilled = (
        export_onnx(model, sample, work / name, opset=cfg.export.opset, dynamic_batch=cfg.export.dynamic_batch,
                    input_names=adapter.input_names, output_names=adapter.output_names,
                    float_layers=adapter.float_layers(fp32) if model is not fp32 else None)
        for model, name in ((fp32, "model_fp32.onnx"), (ptq_model, "model_ptq_qdq.onnx"),
                            (qmodel, "model_qat_qdq.onnx"),
                            *((m, f"model_{v.lower().replace(' ', '_').replace('-', '_')}_qdq.onnx")
                              for v, m, _ in distilled)))
    stages["export_s"] = time.time() - t0

    # 5. ONNX Runtime
    t0 = time.time()
    ort_rows = {}
    for variant, path, prec in (("FP32", onnx_fp32, "fp32"), (f"PTQ-{best_method}", onnx_ptq, "int8 (Q/DQ)"),
                                ("QAT", onnx_qat, "int8 (Q/DQ)"),
                                *((v, p, "int8 (Q/DQ)") for (v, _, _), p in zip(distilled, onnx_distilled))):
        with OnnxrtRunner(path, name=f"{variant} ort") as runner:
            r = ev(runner, f"{variant} ort")
        lat = _ort_latency(path, cfg.run.threads)
        ort_rows[variant] = r
        rows.append({"variant": variant, "backend": "onnxruntime-cpu", "precision": prec, "batch": 1, **_m(r), **lat,
                     "size_mb": _size_mb(path)})
    agreement = output_agreement(qmodel, onnx_qat, val, adapter)
    agreement["map50_95_torch"] = qat_torch["map50_95"]
    agreement["map50_95_ort"] = ort_rows["QAT"]["map50_95"]
    agreement["map50_95_diff_pts"] = 100 * abs(qat_torch["map50_95"] - ort_rows["QAT"]["map50_95"])
    stages["ort_s"] = time.time() - t0
    variants = _prune_sparsity(cfg, adapter, fp32, data_yaml, calib_ds, train, work, ev, best_method, rows,
                               {**next(r for r in rows if r["variant"] == "FP32" and r["backend"] != "torch"),
                                "onnx": onnx_fp32}, stages, sections)

    # lint the Q/DQ graphs
    # layers kept in float on purpose count as deliberate in the coverage (the export declares them in the ONNX)
    lint_qat = lint_onnx(onnx_qat)
    lint_text = lint_qat.format_table() if hasattr(lint_qat, "format_table") else str(lint_qat)
    stages["total_s"] = time.time() - t_start

    fp32_map = rows[0]["map50_95"]
    summary = {
        "fp32_map50_95": fp32_map,
        "best_ptq": {"method": best_method, "map50_95": ptq[best_method]["map50_95"]},
        "qat_torch_map50_95": qat_torch["map50_95"],
        "qat_ort_map50_95": ort_rows["QAT"]["map50_95"],
        "qat_ort_minus_fp32_pts": 100 * (ort_rows["QAT"]["map50_95"] - fp32_map),
        "qat_minus_best_ptq_pts": 100 * (ort_rows["QAT"]["map50_95"] - ptq[best_method]["map50_95"]),
        "torch_vs_ort": agreement,
        "lint": _without_layers(lint_qat.stats) if hasattr(lint_qat, "stats") else None,
        "qat_history": qat_result["history"],
    }
    for variant, _, info in distilled:
        summary.setdefault("distill", {})[variant] = {
            **info, "ort_map50_95": ort_rows[variant]["map50_95"],
            "ort_minus_fp32_pts": 100 * (ort_rows[variant]["map50_95"] - fp32_map)}
    if variants:
        summary["prune_sparsity"] = variants["summary"]
    meta = {"config": cfg.to_dict(), "versions": _versions(), "stage_seconds": stages, "summary": summary,
            "artifacts": {k: str(v) for k, v in (("onnx_fp32", onnx_fp32), ("onnx_ptq", onnx_ptq),
                                                 ("onnx_qat", onnx_qat), ("amax", calib_dir / "amax.pt"))},
            "not_measured": "TensorRT rows (FP32/FP16/INT8 engines): `trt-qat run` builds no engines, so it runs on "
                            "any CPU. Build them from the ONNX files above with `trt-qat build` on a GPU or Jetson, "
                            "then `trt-qat eval --engine E --json` and `trt-qat bench --engine E --exportJson`, and "
                            "merge everything with `trt-qat report`."}
    sections = [("Not measured", meta["not_measured"]),
                ("Summary", json.dumps(summary, indent=2, default=str)),
                ("Q/DQ placement lint (QAT ONNX)", lint_text), *sections,
                ("Quantizers", quantizer_summary(qmodel))]
    report = write_report(rows, out, meta=meta, title=f"trt_qat report: {cfg.run.name}", sections=sections,
                          images=images)
    return report


def distill_variants(cfg: PipelineConfig, adapter, ptq_model, fp32, train, data_yaml, work, ev, rows,
                     best_method: str) -> list:
    """The distillation QAT runs ``qat.distill`` asks for, each from the best PTQ with the FP32 model as teacher:
    with labels (the same steps and learning rate as plain QAT) and label-free (bare images, no label read; the best
    epoch by the held-out distillation loss). Appends their PyTorch rows; returns ``[(variant, model, info)]``."""
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.data.yolo import ImageFolder, load_data_yaml
    from trt_qat.train.distill import held_out_distill_score, make_distill, split_held_out
    from trt_qat.train.loop import run_fingerprint
    from trt_qat.train.qat import finetune

    d, bs, out = cfg.qat.distill, cfg.data.batch_size, []
    if not d.mode:
        return out
    runs = [(f"QAT distill-{d.mode}", True)] + ([("QAT label-free", False)] if d.label_free else [])
    for variant, labels in runs:
        model = copy.deepcopy(ptq_model)
        loss, teacher = make_distill(model, adapter, d, labels=labels, teacher_model=copy.deepcopy(fp32))
        torch.manual_seed(cfg.run.seed)
        if labels:
            data, qcfg = train, cfg.qat
            eval_fn, score = (lambda m, v=variant: ev(m, f"{v} (epoch) torch")["map50_95"]), "val mAP50-95"
        else:
            source = d.images or load_data_yaml(data_yaml, splits=[cfg.data.train_split])[cfg.data.train_split]
            data, held = split_held_out(ImageFolder(source, imgsz=cfg.data.imgsz))
            held_loader = build_dataloader(held, batch_size=bs)
            qcfg = dataclasses.replace(cfg.qat, optimizer=d.label_free_optimizer, lr=d.label_free_lr)
            eval_fn = lambda m, loss=loss, t=teacher, h=held_loader: held_out_distill_score(m, loss, t, h)  # noqa: E731
            score = "held-out distillation loss (no labels)"
        result = finetune(model, build_dataloader(data, batch_size=bs, shuffle=True, workers=cfg.data.workers),
                          loss, config=qcfg, eval_fn=eval_fn, teacher=teacher, higher_is_better=labels,
                          checkpoint_dir=work / variant.lower().replace(" ", "_"),
                          fingerprint=run_fingerprint([cfg.to_dict(), best_method, variant], fp32))
        r = ev(model, f"{variant} torch")
        rows.append({"variant": variant, "backend": "torch", "precision": "int8 (fake-quant)", "batch": bs, **_m(r),
                     "size_mb": _state_size_mb(model), "notes": f"from PTQ-{best_method}; best epoch by {score}"})
        out.append((variant, model, {"best_epoch_by": score, "torch_map50_95": r["map50_95"],
                                     "history": result["history"]}))
    return out


def _prune_sparsity(cfg, adapter, fp32, data_yaml, calib_ds, train, work, ev, best_method, rows, baseline, stages,
                    sections):
    """The ``prune:`` / ``sparsity:`` variants (:mod:`trt_qat.prune.variants`) when the config enables them: their
    rows and report section are appended; returns their result, or None (the default: nothing runs)."""
    from trt_qat.prune.variants import run_variants, variant_plans

    if not variant_plans(cfg):
        return None
    t0 = time.time()
    result = run_variants(cfg, adapter, fp32, data_yaml, calib_ds, train, work, ev, _ort_latency, best_method,
                          baseline)
    rows.extend(result["rows"])
    sections.append(result["section"])
    stages["prune_sparsity_s"] = time.time() - t0
    return result


def _without_layers(stats: dict) -> dict:
    """Lint statistics without the per-conv 2:4 list (it is in the lint table when some conv holds 2:4)."""
    out = dict(stats)
    if isinstance(out.get("sparsity"), dict):
        out["sparsity"] = {k: v for k, v in out["sparsity"].items() if k != "layers"}
    return out


def _m(r: dict) -> dict:
    return {"map50": r["map50"], "map50_95": r["map50_95"]}
