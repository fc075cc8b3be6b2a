"""Latency benchmark through any runner, reported with trtexec's names: ``python -m trt_qat.benchmark``
(also ``trt-qat bench``).

* TensorRT (:class:`~trt_qat.runners.trt.TrtRunner`): CUDA events time the H2D copies, the GPU compute and the
  D2H copies separately; Latency = H2D + GPU Compute + D2H per query, as in trtexec; Enqueue Time is the host
  time spent launching. ``--noDataTransfers`` runs the engine on inputs already on the device, and
  ``--useCudaGraph`` replays a captured CUDA graph.
* ONNX Runtime (and any other runner): Latency is the host timer around each inference; the GPU-side numbers are
  stated as not measured, never estimated.

Each statistic is min / max / mean / median / p90 / p95 / p99 plus the coefficient of variation; a CV above
10 % gets a warning (the machine was busy, clocks were changing, or the run was too short).
"""
from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import numpy as np

from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_write_json

__all__ = ["latency_stats", "benchmark", "format_summary", "make_feed", "write_results", "METRICS",
           "CV_WARN_PERCENT"]

#: trtexec's names, in its order
METRICS = ("Latency", "Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency")
CV_WARN_PERCENT = 10.0


def latency_stats(samples_ms) -> dict:
    """Summary statistics of latency samples in milliseconds.

    Args:
        samples_ms (Sequence[float]): the samples (ms).

    Returns:
        dict: ``min, max, mean, median, p90, p95, p99`` (ms), ``cv`` (coefficient of variation, percent: std/mean
        * 100) and ``count``.
    """
    a = np.asarray(list(samples_ms), dtype=np.float64)
    if a.size == 0:
        raise TrtQatError("no latency samples; run at least one iteration (--iterations >= 1)")
    mean = float(a.mean())
    p90, p95, p99, median = (float(v) for v in np.percentile(a, [90, 95, 99, 50]))
    return {
        "min": float(a.min()), "max": float(a.max()), "mean": mean, "median": median,
        "p90": p90, "p95": p95, "p99": p99,
        "cv": float(a.std() / mean * 100.0) if mean > 0 else 0.0,
        "count": int(a.size),
    }


def _batch_of(feed: dict) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if getattr(first, "ndim", 0) else 1


def benchmark(runner, feed, warmup_ms: float = 200, duration_s: float = 3, iterations: int = 10,
              no_data_transfers: bool = False, cuda_graph: bool = False) -> dict:
    """Time ``runner`` on ``feed`` like trtexec: warm up, then run for at least ``iterations`` queries *and*
    at least ``duration_s`` seconds.

    Args:
        runner (BaseRunner): an active or inactive runner (activated here if needed).
        feed (dict | np.ndarray): the inputs of one query.
        warmup_ms (float): warm-up time in ms, not recorded. Defaults to 200.
        duration_s (float): minimum measured time in s. Defaults to 3.
        iterations (int): minimum number of measured queries. Defaults to 10.
        no_data_transfers (bool): TensorRT only: skip H2D/D2H, time the engine on device-resident inputs.
            Defaults to False.
        cuda_graph (bool): TensorRT >= 10 only: replay a captured CUDA graph. Defaults to False.

    Returns:
        dict: ``"Throughput (qps)"`` and one stats dict (see :func:`latency_stats`) per trtexec metric, None for
        those not measured (listed under ``"not_measured"``), plus ``warnings`` and ``settings``.
    """
    if iterations < 1 or duration_s < 0 or warmup_ms < 0:
        raise TrtQatError("--iterations must be >= 1 and --duration/--warmUp >= 0")
    owns = not runner.is_active
    if owns:
        runner.activate()
    warnings: list[str] = []
    try:
        if not isinstance(feed, dict):
            feed = {runner.input_names[0]: feed}
        gpu_timed = hasattr(runner, "last_timings")
        if (no_data_transfers or cuda_graph) and not gpu_timed:
            warnings.append(f"--noDataTransfers/--useCudaGraph apply to TensorRT engines only; ignored for "
                            f"backend '{runner.backend}'")
            no_data_transfers = cuda_graph = False
        if cuda_graph:
            runner.cuda_graph = True
        runner.infer(feed)  # first run: shapes, allocation, graph capture
        if cuda_graph and not getattr(runner, "cuda_graph", False):
            warnings.append("CUDA graph capture was not possible; measured without it")

        def run_once():
            if no_data_transfers:
                return runner.execute_only()
            runner.infer(feed)
            return runner.last_timings() if gpu_timed else None

        end_warm = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < end_warm:
            run_once()

        host_ms, records = [], []
        start = time.perf_counter()
        deadline = start + duration_s
        while len(host_ms) < iterations or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            rec = run_once()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            records.append(rec)
        wall_s = time.perf_counter() - start
    finally:
        if owns:
            runner.deactivate()

    n = len(host_ms)
    result = {"backend": runner.backend, "runner": runner.name, "batch": _batch_of(feed),
              "input_shapes": {k: list(np.shape(v)) for k, v in feed.items()}, "queries": n,
              "Total Host Walltime (s)": wall_s, "Throughput (qps)": n / wall_s if wall_s > 0 else float("inf")}
    result["Throughput (images/s)"] = result["Throughput (qps)"] * result["batch"]
    not_measured = []
    if gpu_timed:
        h2d = [r["h2d_ms"] for r in records]
        compute = [r["compute_ms"] for r in records]
        d2h = [r["d2h_ms"] for r in records]
        result["Latency"] = latency_stats([a + b + c for a, b, c in zip(h2d, compute, d2h)])
        result["Enqueue Time"] = latency_stats([r["enqueue_ms"] for r in records])
        if no_data_transfers:
            result["H2D Latency"] = result["D2H Latency"] = None
            not_measured += ["H2D Latency", "D2H Latency"]
        else:
            result["H2D Latency"] = latency_stats(h2d)
            result["D2H Latency"] = latency_stats(d2h)
        result["GPU Compute Time"] = latency_stats(compute)
        result["Total GPU Compute Time (s)"] = float(sum(compute)) / 1e3
        result["latency_source"] = "CUDA events (H2D + GPU compute + D2H)"
        unstable = result["GPU Compute Time"]
        label = "GPU compute time"
    else:
        result["Latency"] = latency_stats(host_ms)
        for name in METRICS[1:]:
            result[name] = None
        not_measured += list(METRICS[1:])
        result["latency_source"] = "host timer around each inference"
        unstable = result["Latency"]
        label = "latency"
    if unstable["cv"] > CV_WARN_PERCENT:
        warnings.append(f"{label} is unstable, with coefficient of variation = {unstable['cv']:.1f}% "
                        f"(> {CV_WARN_PERCENT:.0f}%); close other programs, lock clocks (Jetson: "
                        "`sudo jetson_clocks`) or run longer (--duration)")
    for w in warnings:
        LOG.warning("%s", w)
    result["not_measured"] = not_measured
    result["warnings"] = warnings
    result["settings"] = {"warmup_ms": warmup_ms, "duration_s": duration_s, "iterations": iterations,
                          "no_data_transfers": no_data_transfers, "cuda_graph": cuda_graph}
    result["summary"] = {"latency_ms_median": result["Latency"]["median"], "latency_ms_p99": result["Latency"]["p99"],
                         "qps": result["Throughput (qps)"], "images_per_s": result["Throughput (images/s)"]}
    return result


def _fmt_stats(s: dict, unit: str = "ms") -> str:
    return (f"min = {s['min']:.5g} {unit}, max = {s['max']:.5g} {unit}, mean = {s['mean']:.5g} {unit}, "
            f"median = {s['median']:.5g} {unit}, percentile(90%) = {s['p90']:.5g} {unit}, "
            f"percentile(95%) = {s['p95']:.5g} {unit}, percentile(99%) = {s['p99']:.5g} {unit}")


def format_summary(result: dict) -> str:
    """A trtexec-like "Performance summary" of a :func:`benchmark` result."""
    lines = ["=== Performance summary ===",
             f"Backend: {result.get('backend')} ({result.get('runner')}), batch {result.get('batch')}, "
             f"{result.get('queries')} queries",
             f"Throughput: {result['Throughput (qps)']:.5g} qps ({result['Throughput (images/s)']:.5g} images/s)"]
    for name in METRICS:
        stats = result.get(name)
        if stats:
            lines.append(f"{name}: {_fmt_stats(stats)}")
    lines.append(f"Total Host Walltime: {result['Total Host Walltime (s)']:.5g} s")
    if result.get("Total GPU Compute Time (s)") is not None:
        lines.append(f"Total GPU Compute Time: {result['Total GPU Compute Time (s)']:.5g} s")
    lines.append(f"Latency measured by: {result.get('latency_source')}")
    if result.get("not_measured"):
        lines.append(f"Not measured on this backend: {', '.join(result['not_measured'])}")
    for w in result.get("warnings", []):
        lines.append(f"* {w}")
    return "\n".join(lines)


def write_results(path, result: dict, extra: dict | None = None) -> Path:
    """Write a benchmark result (plus ``extra`` fields such as model and precision) as JSON, atomically."""
    doc = dict(extra or {})
    doc.update(result)
    doc.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    doc.setdefault("host", platform.node())
    return atomic_write_json(path, doc)


# ----------------------------------------------------------------------------------------------------------
# Feeds and CLI
# ----------------------------------------------------------------------------------------------------------
def make_feed(runner, batch: int | None = None, shapes: dict | None = None, seed: int = 0) -> dict:
    """Random inputs for an active runner: ``shapes`` (``{name: shape}``) wins; otherwise dynamic dimension 0
    becomes ``batch`` (default 1) and other dynamic dimensions come from a TensorRT profile's opt shape.

    Args:
        runner (BaseRunner): an active runner exposing ``input_shapes`` (and ``input_dtypes``).
        batch (int | None): the batch size for dynamic (or, with ONNX Runtime, any) dimension 0. Defaults to 1.
        shapes (dict | None): explicit shapes per input. Defaults to None.
        seed (int): random seed. Defaults to 0.

    Returns:
        dict[str, np.ndarray]: the feed.
    """
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(runner.input_shapes))
    if unknown:
        raise TrtQatError(f"--shapes names unknown inputs {unknown}; the model's inputs are "
                          f"{list(runner.input_shapes)}")
    dtypes = getattr(runner, "input_dtypes", {})
    feed = {}
    for name, declared in runner.input_shapes.items():
        if name in shapes:
            shape = tuple(int(d) for d in shapes[name])
        else:
            dims = [d if isinstance(d, int) and d > 0 else None for d in declared]
            if batch is not None and dims:
                if dims[0] is not None and dims[0] != batch:
                    raise TrtQatError(f"input '{name}' has a fixed batch of {dims[0]}; --batch {batch} needs a "
                                      "dynamic-batch export/engine")
                dims[0] = batch
            elif dims and dims[0] is None:
                dims[0] = 1
            if any(d is None for d in dims):
                opt = None
                if hasattr(runner, "profile_shapes"):
                    opt = list(runner.profile_shapes(name)[1])
                    dims = [d if d is not None else o for d, o in zip(dims, opt)]
                if any(d is None for d in dims):
                    raise TrtQatError(f"input '{name}' has dynamic dimensions {list(declared)}; give its shape "
                                      f"with --shapes {name}:1x3x640x640")
            shape = tuple(dims)
        dtype = np.dtype(dtypes.get(name, np.float32))
        if dtype.kind == "f":
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feed[name] = rng.integers(0, 127, size=shape).astype(dtype)
    return feed
