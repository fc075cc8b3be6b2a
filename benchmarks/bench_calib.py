"""Calibration cost of the built-in detector: statistics pass vs a plain forward, and amax computation.

1. **Statistics pass** over ``--batches`` synthetic batches (``--batch`` x 3 x ``--imgsz``\u00b2), timed as a whole:
   * ``forward``: the FP32 model, eval mode, ``torch.no_grad()`` (the baseline);
   * ``calib-max``: :func:`trt_qat.calibrate.collect_stats` with ``histogram=False`` (running max only);
   * ``calib-hist``: ``collect_stats`` with histograms (needed for percentile / mse / entropy);
   * ``pq-hist``: the same pass with pytorch-quantization's ``HistogramCalibrator`` in every activation quantizer
     (its ``torch.histc`` collection), for comparison.
   Variants are interleaved round by round (rotated order) in one process; the median of ``--rounds`` is reported.
2. **compute_amax** for every activation quantizer of the detector (after one histogram pass), per method
   (percentile, mse, entropy), timed for trt_qat's vectorised searches and for pytorch-quantization 2.1.3's
   ``HistogramCalibrator.compute_amax`` on the very same histograms. The reference entropy search is a Python loop
   (about a second per quantizer), so by default it is timed on ``--ref-quantizers`` quantizers and scaled to all
   of them (marked ``est.``); ``--ref-all`` times them all. The reference mse calls ``.cuda()``: on a machine
   without CUDA its exact loop is re-run on the CPU instead (same code with the ``.cuda()`` calls dropped; marked
   ``cpu re-impl``). The largest relative amax difference to the reference is printed too.
3. **Counting floor**: ``torch.bincount`` alone over the very bin indices the histogram pass counts. It is a
   single-threaded loop in PyTorch's CPU backend, so the max-only pass plus this time bounds, from below, any
   exact histogram pass that counts with ``bincount`` on this machine (``--no-floor`` skips it).

Usage::

    python benchmarks/bench_calib.py                 # CPU, 2 threads
    python benchmarks/bench_calib.py --json calib.json
    python benchmarks/bench_calib.py --device cuda       # on a CUDA GPU (no counting floor there)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METHODS = ("percentile", "mse", "entropy")


def reference_mse_cpu(calib_hist, calib_bin_edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    """pytorch-quantization 2.1.3's ``_compute_amax_mse`` loop, unchanged except that it stays on the CPU."""
    from pytorch_quantization.tensor_quant import fake_tensor_quant

    counts = torch.from_numpy(calib_hist[:]).float()
    edges = torch.from_numpy(calib_bin_edges[:]).float()
    centers = (edges[1:] + edges[:-1]) / 2
    mses, arguments = [], []
    for i in range(start_bin, len(centers), stride):
        amax = centers[i]
        quant_centers = fake_tensor_quant(centers, amax, num_bits, unsigned)
        mse = ((quant_centers - centers) ** 2 * counts).mean()
        mses.append(mse.cpu())
        arguments.append(i)
    argmin = np.argmin(mses)
    return centers[arguments[argmin]]


def reference_calibrator(cal):
    """A pytorch-quantization ``HistogramCalibrator`` holding the histogram that ``cal`` collected."""
    from pytorch_quantization.calib import HistogramCalibrator

    ref = HistogramCalibrator(cal.num_bits, None, cal.unsigned)
    ref._calib_hist = cal.hist.float().cpu()
    ref._calib_bin_edges = cal.edges().float().cpu()
    return ref


def reference_amax(cal, method, percentile=99.99):
    """amax from pytorch-quantization's code for the histogram in ``cal`` (mse on the CPU without CUDA)."""
    ref = reference_calibrator(cal)
    if method == "mse" and not torch.cuda.is_available():
        hist = ref._calib_hist.int().cpu().numpy()
        edges = ref._calib_bin_edges.cpu().numpy()
        return float(reference_mse_cpu(hist, edges, cal.num_bits, cal.unsigned))
    return float(ref.compute_amax(method, percentile=percentile))


def _quantized_model(imgsz, device="cpu"):
    from bench_qat_step import build_variant

    model = build_variant("fp32", "cpu", imgsz)
    from trt_qat.config import QuantConfig
    from trt_qat.quant.instrument import quantize

    return quantize(model, QuantConfig()).to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(args) -> list:
    """Time the statistics passes (interleaved rounds); returns one row per variant."""
    from bench_qat_step import build_variant, synthetic_batch

    from trt_qat.calibration.calibrate import collect_stats

    batches = [synthetic_batch(args.batch, args.imgsz, seed=i)[0].to(args.device) for i in range(args.batches)]
    fp32 = build_variant("fp32", args.device, args.imgsz).eval()
    qmodel = _quantized_model(args.imgsz, args.device)
    # the same statistics pass with pytorch-quantization's own HistogramCalibrator (torch.histc per batch)
    from pytorch_quantization.calib import HistogramCalibrator

    from trt_qat.quant.quantizer import activation_quantizers

    ref_model = _quantized_model(args.imgsz, args.device)
    for _, q in activation_quantizers(ref_model):
        q._calibrator = HistogramCalibrator(8, None, False)

    def forward():
        with torch.no_grad():
            for b in batches:
                fp32(b)

    passes = {
        "forward": forward,
        "calib-max": lambda: collect_stats(qmodel, batches, histogram=False, progress=False),
        "calib-hist": lambda: collect_stats(qmodel, batches, histogram=True, progress=False),
        "pq-hist": lambda: collect_stats(ref_model, batches, histogram=True, progress=False),
    }
    times = {k: [] for k in passes}
    names = list(passes)
    for name in names:  # warm-up
        passes[name]()
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(args.device)
            t0 = time.perf_counter()
            passes[name]()
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
    passes["calib-hist"]()  # leave the histograms of one full pass for compute_amax
    base = statistics.median(times["forward"])
    return [{"variant": n, "median_ms": statistics.median(times[n]) * 1e3, "min_ms": min(times[n]) * 1e3,
             "ratio_to_forward": statistics.median(times[n]) / base,
             "min_ratio_to_forward": min(times[n]) / min(times["forward"])} for n in names], qmodel


def time_count_floor(qmodel, batches, forward_ms: float) -> dict:
    """The serial part of histogram collection, timed alone: ``torch.bincount`` of the very bin indices that the
    histogram pass counts (every distinct activation-quantizer input of every batch, with the final bin widths).

    ``bincount`` is a single-threaded loop in PyTorch's CPU backend: the max-only pass plus this time bounds, from
    below, a histogram pass that counts every element exactly with ``bincount``.
    """
    from trt_qat.quant.calibrator import bin_indices
    from trt_qat.quant.quantizer import activation_quantizers

    quantizers = [q for _, q in activation_quantizers(qmodel)]
    seen = []
    recorded = []

    def recorder(cal, collect):
        def wrapped(x):
            collect(x)
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen[0]:  # a tensor two quantizers read is counted once, as in the pass itself
                seen[0][key] = x  # (kept alive until the next batch, so that its address is not reused)
                recorded.append((cal, x.detach().clone()))
        return wrapped

    originals = [q._calibrator.collect for q in quantizers]
    for q in quantizers:
        q._calibrator.collect = recorder(q._calibrator, q._calibrator.collect)
    try:
        from trt_qat.calibration.calibrate import collect_stats

        def batch_iter():
            for b in batches:
                seen[:] = [{}]
                yield b

        collect_stats(qmodel, batch_iter(), histogram=True, progress=False)
    finally:
        for q, c in zip(quantizers, originals):
            q._calibrator.collect = c
    idx = []
    seen.clear()
    for cal, x in recorded:  # the pass's own bin indices
        n = cal.hist.numel()
        idx.append((bin_indices(x, cal.width, n), n))
    recorded.clear()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i, n in idx:
            torch.bincount(i, minlength=n)
        times.append(time.perf_counter() - t0)
    ms = min(times) * 1e3
    return {"elements": sum(i.numel() for i, _ in idx), "bincount_ms": ms, "forward_ms": forward_ms,
            "ratio_to_forward": ms / forward_ms}


def time_compute_amax(qmodel, args) -> list:
    """Time compute_amax over all activation quantizers per method, ours vs the reference."""
    from trt_qat.quant.quantizer import activation_quantizers

    cals = [(n, q._calibrator) for n, q in activation_quantizers(qmodel)]
    rows = []
    for method in METHODS:
        t0 = time.perf_counter()
        ours = {n: float(c.compute_amax(method, percentile=args.percentile)) for n, c in cals}
        t_ours = time.perf_counter() - t0
        k = len(cals) if (args.ref_all or method == "percentile") else min(args.ref_quantizers, len(cals))
        # the reference on the k quantizers with the longest histograms first: a conservative extrapolation
        subset = sorted(cals, key=lambda nc: -nc[1].hist.numel())[:k]
        t0 = time.perf_counter()
        ref = {n: reference_amax(c, method, args.percentile) for n, c in subset}
        t_ref = (time.perf_counter() - t0) * len(cals) / max(k, 1)
        rel = max(abs(ours[n] - v) / max(abs(v), 1e-12) for n, v in ref.items())
        note = []
        if k < len(cals):
            note.append(f"est. from {k}")
        if method == "mse" and not torch.cuda.is_available():
            note.append("cpu re-impl")
        rows.append({"method": method, "quantizers": len(cals), "trt_qat_s": t_ours, "reference_s": t_ref,
                     "reference_note": ", ".join(note), "speedup": t_ref / t_ours if t_ours > 0 else None,
                     "max_rel_amax_diff": rel, "reference_quantizers_timed": k})
    return rows


def table(pass_rows, amax_rows, args, floor=None) -> str:
    size = f"{args.batch}x3x{args.imgsz}x{args.imgsz}"
    where = f"{args.device}, {args.threads} threads" if args.device == "cpu" else args.device
    lines = [f"Calibration statistics pass, yolo-n, {args.batches} batches of {size}, {where}, "
             f"median of {args.rounds} rounds",
             f"{'pass':<12} {'median ms':>10} {'x forward':>10} {'min ms':>9} {'x forward':>10}"]
    for r in pass_rows:
        lines.append(f"{r['variant']:<12} {r['median_ms']:>10.1f} {r['ratio_to_forward']:>10.2f} {r['min_ms']:>9.1f} "
                     f"{r['min_ratio_to_forward']:>10.2f}")
    if floor:  # fastest runs throughout: the least disturbed figures, and the bincount time is a fastest run too
        calib_max = next(r["min_ratio_to_forward"] for r in pass_rows if r["variant"] == "calib-max")
        lines += ["", f"counting floor: bincount alone over the same {floor['elements'] / 1e6:.1f}M bin indices "
                  f"(single-threaded in PyTorch) takes {floor['bincount_ms']:.1f} ms = "
                  f"{floor['ratio_to_forward']:.2f} x the fastest forward; fastest max-only pass + bincount alone = "
                  f"{calib_max + floor['ratio_to_forward']:.2f} x forward"]
    if amax_rows:
        n = amax_rows[0]["quantizers"]
        lines += ["", f"compute_amax for all {n} activation quantizers (seconds)",
                  f"{'method':<11} {'trt_qat':>8} {'reference':>10} {'speedup':>8} {'max |rel diff|':>15}  reference"]
        for r in amax_rows:
            lines.append(f"{r['method']:<11} {r['trt_qat_s']:>8.3f} {r['reference_s']:>10.2f} {r['speedup']:>8.0f} "
                         f"{r['max_rel_amax_diff']:>15.2e}  {r['reference_note'] or 'timed'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]. Default cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads. Default 2")
    parser.add_argument("--batches", type=int, default=8, help="batches per statistics pass. Default 8")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per pass. Default 9")
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--ref-quantizers", type=int, default=3,
                        help="quantizers on which the reference mse/entropy are timed (scaled to all). Default 3")
    parser.add_argument("--ref-all", action="store_true", help="time the reference on every quantizer (minutes)")
    parser.add_argument("--no-amax", dest="amax", action="store_false", help="skip the compute_amax timings")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip timing bincount alone (the serial floor of exact histogram counting)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA GPU is available")
    torch.set_num_threads(args.threads)
    from trt_qat.quant.quantizer import quiet_absl

    quiet_absl()
    pass_rows, qmodel = time_passes(args)
    amax_rows = time_compute_amax(qmodel, args) if args.amax else []
    floor = None
    if args.floor and args.device == "cpu":  # (bincount is a parallel kernel on CUDA)
        from bench_qat_step import synthetic_batch

        batches = [synthetic_batch(args.batch, args.imgsz, seed=i)[0].to(args.device) for i in range(args.batches)]
        forward_ms = next(r["min_ms"] for r in pass_rows if r["variant"] == "forward")
        floor = time_count_floor(_quantized_model(args.imgsz, args.device), batches, forward_ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"torch": torch.__version__, "device": args.device, "threads": args.threads,
                                "batches": args.batches, "batch": args.batch, "imgsz": args.imgsz,
                                "rounds": args.rounds},
                       "passes": pass_rows, "compute_amax": amax_rows, "count_floor": floor}, f, indent=2)
    print(table(pass_rows, amax_rows, args, floor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
