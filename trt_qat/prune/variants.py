"""The pipeline's pruned and 2:4 variants (``prune:`` and ``sparsity:`` in a run config, both off by default).

Each variant starts from the FP32 model: pruned (:func:`trt_qat.prune.prune`) or 2:4-sparsified
(:func:`trt_qat.prune.sparsity.sparsify`), fine-tuned (:func:`trt_qat.prune.finetune.finetune_fp32`; the pruned one
distilled from the unpruned model), then calibrated with the run's best PTQ method and QAT-trained (2:4 masks
re-applied after every step), exported to FP32 and Q/DQ ONNX, evaluated and timed in ONNX Runtime and linted.
Report rows: "<variant> FP32" and "<variant> QAT" (ONNX Runtime), plus a section with params and GMACs.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch

from trt_qat.errors import LOG, TrtQatError

__all__ = ["run_variants", "run_variant", "variant_plans", "ORT_NO_SPARSE_NOTE"]

ORT_NO_SPARSE_NOTE = ("2:4 sparsity gives no speed in ONNX Runtime (it has no sparse kernels: the zeros are "
                      "multiplied like any other weight); it pays off only in a TensorRT engine built with "
                      "`trt-qat build --sparsity enable` on sparse tensor cores (Ampere and later, Orin), and only "
                      "for the convs large enough to use them. Pruning removes channels, so its ONNX Runtime speed-up "
                      "is real; at small input sizes per-op overhead hides most of it (see "
                      "benchmarks/prune_ablation.py at 640x640).")


def variant_plans(cfg) -> list:
    """``[(label, kind)]`` of the variants ``cfg`` enables: ("pruned", "prune") and/or ("2:4", "sparsity")."""
    plans = []
    if cfg.prune.target_macs is not None or cfg.prune.target_params is not None:
        plans.append(("pruned", "prune"))
    if cfg.sparsity.enabled:
        plans.append(("2:4", "sparsity"))
    return plans


def check_variants(cfg, fp32) -> None:
    """Refuse, before any of the run starts, a ``prune:`` / ``sparsity:`` section that cannot work on ``fp32``: a
    ``prune.keep`` pattern matching no layer, or a 2:4 threshold no conv reaches."""
    from trt_qat.prune.core import match_keep
    from trt_qat.prune.sparsity import eligible_convs

    kinds = {kind for _, kind in variant_plans(cfg)}
    if "prune" in kinds:
        match_keep(fp32, cfg.prune.keep, flag="prune.keep")
    if "sparsity" in kinds and not eligible_convs(fp32, cfg.sparsity.min_channels)[0]:
        raise TrtQatError(f"sparsity.min_channels={cfg.sparsity.min_channels}: no conv of this model is that wide, so "
                          "2:4 would apply nowhere; lower sparsity.min_channels or set sparsity.enabled: false")


def _lint_brief(stats: dict) -> dict:
    keep = ("int8_coverage", "scale_mismatches", "requantize_chains", "reformat_sites", "errors", "warnings")
    out = {k: stats.get(k) for k in keep}
    sp = stats.get("sparsity") or {}
    out["sparsity"] = {k: v for k, v in sp.items() if k != "layers"}
    return out


def _gmacs(onnx_path) -> float:
    from trt_qat.onnx.lint import lint_onnx

    return lint_onnx(onnx_path).stats.get("total_macs", 0) / 1e9


def _params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def run_variants(cfg, adapter, fp32, data_yaml, calib_ds, train, work, ev, ort_latency, best_method: str,
                 baseline: dict) -> dict | None:
    """Run the enabled variants (see the module docstring).

    Args:
        cfg (PipelineConfig): the run config.
        adapter (ModelAdapter): the model family.
        fp32 (nn.Module): the unpruned FP32 model (left untouched).
        data_yaml (Path): the data.yaml.
        calib_ds, train: the calibration and training datasets of the run.
        work (Path): the run's artifacts directory.
        ev (Callable): ``ev(model_or_runner, name) -> metrics`` (the pipeline's evaluation).
        ort_latency (Callable): ``ort_latency(onnx_path, threads) -> {latency_ms_p50, ...}``.
        best_method (str): the calibration method the unpruned PTQ chose.
        baseline (dict): the unpruned FP32 model's ONNX Runtime row plus ``onnx`` (its path).

    Returns:
        dict | None: ``rows``, ``summary``, ``section`` (heading, text), or None when no variant is enabled.
    """
    plans = variant_plans(cfg)
    if not plans:
        return None
    rows, summary = [], {"baseline": {"params": _params(fp32), "gmacs": _gmacs(baseline["onnx"]),
                                      "ort_map50_95": baseline["map50_95"],
                                      "ort_latency_ms_p50": baseline.get("latency_ms_p50")}}
    for label, kind in plans:
        result = run_variant(cfg, label, kind, adapter, fp32, data_yaml, calib_ds, train, work, ev, ort_latency,
                             best_method)
        rows += result["rows"]
        summary[label] = result["info"]
    return {"rows": rows, "summary": summary, "section": ("Pruning and 2:4 sparsity", _section(summary))}


def run_variant(cfg, label: str, kind: str, adapter, fp32, data_yaml, calib_ds, train, work, ev, ort_latency,
                best_method: str) -> dict:
    """One variant: ``kind`` "prune" (``cfg.prune``) or "sparsity" (``cfg.sparsity``), fine-tuned, calibrated with
    ``best_method``, QAT-trained, exported and evaluated in ONNX Runtime (arguments as :func:`run_variants`).

    Returns:
        dict: ``rows`` (its two ONNX Runtime rows), ``info`` (params, GMACs, mAPs, lint of the Q/DQ ONNX, ...),
        ``model`` (FP32, fine-tuned) and ``qmodel`` (after QAT).
    """
    from trt_qat.calibration.calibrate import collect_stats, compute_amax
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.onnx.export import export_onnx
    from trt_qat.onnx.lint import lint_onnx
    from trt_qat.prune.core import prune
    from trt_qat.prune.finetune import finetune_fp32
    from trt_qat.prune.sparsity import sparsify, sparsity_hook
    from trt_qat.quant.instrument import quantize
    from trt_qat.runners.onnxrt import OnnxrtRunner
    from trt_qat.train.qat import finetune

    imgsz, bs, min_ch = cfg.data.imgsz, cfg.data.batch_size, cfg.sparsity.min_channels
    sample = adapter.sample_input(imgsz)
    t0 = time.time()
    torch.manual_seed(cfg.run.seed)
    model = copy.deepcopy(fp32).eval()
    info, rows = {}, []
    if kind == "prune":
        p = cfg.prune
        rep = prune(model, sample, target_macs=p.target_macs, target_params=p.target_params,
                    importance=p.importance, keep=p.keep, round_to=p.round_to)
        info["prune"] = {k: rep[k] for k in ("macs_ratio", "params_ratio", "kept", "untraceable_kept")}
        epochs, lr, teacher = p.finetune_epochs, p.finetune_lr, copy.deepcopy(fp32) if p.distill else None
    else:
        res = sparsify(model, min_ch)
        info["sparsity"] = {"rule": res["rule"], "layers": sorted(res["masks"])}
        epochs, lr, teacher = cfg.sparsity.finetune_epochs, cfg.sparsity.finetune_lr, None
    if epochs:
        tuned = finetune_fp32(model, adapter, data_yaml, epochs=epochs, lr=lr, imgsz=imgsz, batch_size=bs,
                              max_steps=cfg.qat.max_steps_per_epoch, teacher_model=teacher,
                              min_channels=min_ch, max_val_images=cfg.data.max_val_images,
                              workers=cfg.data.workers, seed=cfg.run.seed)
        info["finetune"] = {k: tuned[k] for k in ("map50_95", "best_epoch")}
    slug = "".join(c if c.isalnum() else "_" for c in label).strip("_")
    # calibrate with the method the unpruned PTQ chose, then QAT (2:4 masks kept after every step)
    quant_cfg = dataclasses.replace(cfg.quant, skip=[*cfg.quant.skip, *adapter.float_skip_patterns(model)])
    qmodel = quantize(copy.deepcopy(model), quant_cfg, sample_input=sample)
    collect_stats(qmodel, build_dataloader(calib_ds, batch_size=bs), num_batches=cfg.calib.num_batches,
                  histogram=True)
    compute_amax(qmodel, best_method, cfg.calib.percentile)
    hook = sparsity_hook(qmodel, min_ch) if kind == "sparsity" else None
    torch.manual_seed(cfg.run.seed)
    finetune(qmodel, build_dataloader(train, batch_size=bs, shuffle=True, workers=cfg.data.workers),
             adapter.loss_fn(qmodel), config=cfg.qat, eval_fn=lambda m: ev(m, f"{label} QAT (epoch) torch")[
                 "map50_95"], checkpoint_dir=work / f"qat_{slug}", resume=False, extra_hooks=[hook] if hook else ())
    paths = {}
    for which, m in (("fp32", model), ("qat", qmodel)):
        paths[which] = export_onnx(m, sample, work / f"model_{slug}_{which}{'_qdq' if which == 'qat' else ''}.onnx",
                                   opset=cfg.export.opset, dynamic_batch=cfg.export.dynamic_batch,
                                   input_names=adapter.input_names, output_names=adapter.output_names)
    params, gmacs = _params(model), _gmacs(paths["fp32"])
    for which, prec in (("fp32", "fp32"), ("qat", "int8 (Q/DQ)")):
        variant = f"{label} {'FP32' if which == 'fp32' else 'QAT'}"
        with OnnxrtRunner(paths[which], name=f"{variant} ort") as runner:
            r = ev(runner, f"{variant} ort")
        lat = ort_latency(paths[which], cfg.run.threads) or {}
        note = f"params {params / 1e6:.2f}M, {gmacs:.3f} GMACs"
        if kind == "sparsity":
            note += "; 2:4 gives no ONNX Runtime speed-up"
        rows.append({"variant": variant, "backend": "onnxruntime-cpu", "precision": prec, "batch": 1,
                     "map50": r["map50"], "map50_95": r["map50_95"], **lat, "notes": note})
        info[which] = {"ort_map50": r["map50"], "ort_map50_95": r["map50_95"],
                       "ort_latency_ms_p50": lat.get("latency_ms_p50"), "onnx": str(paths[which])}
    info.update(params=params, gmacs=gmacs,
                lint_qat=_lint_brief(lint_onnx(paths["qat"], sparsity_min_channels=min_ch).stats),
                seconds=time.time() - t0)
    LOG.info("%s variant: %.2fM params, %.3f GMACs, QAT mAP50-95 (ORT) %.4f (%.0fs)", label, params / 1e6, gmacs,
             info["qat"]["ort_map50_95"], info["seconds"])
    return {"rows": rows, "info": info, "model": model, "qmodel": qmodel}


def _section(summary: dict) -> str:
    base = summary["baseline"]
    lines = ["| variant | params (M) | GMACs | mAP50-95 (ORT) | Δ vs FP32 (points) | ORT CPU p50 (ms) |",
             "|---|---|---|---|---|---|",
             f"| FP32 | {base['params'] / 1e6:.2f} | {base['gmacs']:.3f} | {base['ort_map50_95']:.4f} | — | "
             f"{base['ort_latency_ms_p50'] or float('nan'):.2f} |"]
    for label, info in summary.items():
        if label == "baseline":
            continue
        for which, name in (("fp32", "FP32"), ("qat", "QAT")):
            m = info[which]["ort_map50_95"]
            lat = info[which]["ort_latency_ms_p50"]
            lines.append(f"| {label} {name} | {info['params'] / 1e6:.2f} | {info['gmacs']:.3f} | {m:.4f} | "
                         f"{100 * (m - base['ort_map50_95']):+.2f} | {'n/a' if lat is None else f'{lat:.2f}'} |")
        lint = info["lint_qat"]
        lines.append("")
        lines.append(f"- {label} QAT lint: {lint['scale_mismatches']} scale mismatches, {lint['requantize_chains']} "
                     f"requantize chains, {lint['reformat_sites']} reformat sites; 2:4-ready convs "
                     f"{lint['sparsity'].get('ready', 0)} ({100 * (lint['sparsity'].get('ready_fraction') or 0):.1f}% "
                     "of conv MACs)")
        lines.append("")
    lines.append(ORT_NO_SPARSE_NOTE)
    return "\n".join(lines)
