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

Limits that keep a typo from hanging the machine or exhausting its memory: ``--warmUp`` and ``--duration`` are
finite, non-negative and at most one day (:data:`MAX_TIMING_S`); ``--iterations`` is a minimum with no upper
limit (a huge value runs that many queries, however long that takes). A random feed (:func:`make_feed`) and an
``.npz`` feed (:func:`~trt_qat.measure.compare.load_npz_feed`) may take at most :func:`feed_memory_budget` bytes:
4 GiB, or half the memory available when that is less.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_write_json
from trt_qat.runners.base import check_inputs, declared_dims

__all__ = ["latency_stats", "benchmark", "check_timing", "format_summary", "make_feed", "write_results",
           "available_memory", "feed_memory_budget", "check_feed_bytes", "METRICS", "CV_WARN_PERCENT",
           "MAX_TIMING_S", "FEED_BYTES_CAP"]

#: trtexec's names, in its order
METRICS = ("Latency", "Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency")
CV_WARN_PERCENT = 10.0
#: the longest warm-up or measured time (seconds) a benchmark accepts: one day; more is a typo, not a benchmark
MAX_TIMING_S = 86400.0
#: the most bytes an input feed may take, whatever the memory available (see :func:`feed_memory_budget`)
FEED_BYTES_CAP = 4 << 30


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


def check_timing(warmup_ms, duration_s, iterations) -> None:
    """Refuse benchmark settings that would never end or mean nothing, before anything runs.

    Args:
        warmup_ms (float): warm-up time in ms: finite, >= 0 and at most :data:`MAX_TIMING_S` seconds.
        duration_s (float): minimum measured time in s: finite, >= 0 and at most :data:`MAX_TIMING_S`.
        iterations (int): minimum number of measured queries: an integer >= 1 (no upper limit: it is a minimum).

    Raises:
        TrtQatError: NaN, an infinite, negative or over-long time, or a non-integer or < 1 iteration count.
    """
    for flag, value, unit, per_s, example in (("--warmUp", warmup_ms, "ms", 1e3, 200),
                                              ("--duration", duration_s, "s", 1.0, 3)):
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and 0 <= value <= MAX_TIMING_S * per_s):
            raise TrtQatError(f"{flag} {value!r} is not a time from 0 to {MAX_TIMING_S * per_s:g} {unit} (one day); "
                              f"give a finite, non-negative time, e.g. {flag} {example}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise TrtQatError(f"--iterations {iterations!r} is not an integer >= 1; give the minimum number of "
                          "measured queries, e.g. --iterations 10")


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
        iterations (int): minimum number of measured queries (no upper limit). Defaults to 10.
        no_data_transfers (bool): TensorRT only: skip H2D/D2H, time the engine on device-resident inputs.
            Defaults to False.
        cuda_graph (bool): TensorRT >= 10 only: replay a captured CUDA graph. Defaults to False.

    Returns:
        dict: ``"Throughput (qps)"`` and one stats dict (see :func:`latency_stats`) per trtexec metric, None for
        those not measured (listed under ``"not_measured"``), plus ``warnings`` and ``settings``.

    Raises:
        TrtQatError: timing settings :func:`check_timing` refuses, before the runner is activated.
    """
    check_timing(warmup_ms, duration_s, iterations)
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
    """Write a benchmark result (plus ``extra`` fields such as model and precision) as strict JSON, atomically
    (non-finite numbers as ``null``, see :func:`trt_qat.fileio.json_safe`)."""
    doc = dict(extra or {})
    doc.update(result)
    doc.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    doc.setdefault("host", platform.node())
    return atomic_write_json(path, doc)


def available_memory() -> int | None:
    """Bytes of memory available now: psutil's figure when psutil is installed, else MemAvailable from
    /proc/meminfo (Linux), else the free pages ``os.sysconf`` reports; None when none of them can be read."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def feed_memory_budget() -> int:
    """The most bytes input feeds may take: :data:`FEED_BYTES_CAP` (4 GiB), or half the memory available now
    (:func:`available_memory`) when that is less."""
    avail = available_memory()
    return FEED_BYTES_CAP if avail is None else min(FEED_BYTES_CAP, avail // 2)


def check_feed_bytes(nbytes: int, what: str, hint: str) -> None:
    """Raise a TrtQatError, before any array is allocated, when ``nbytes`` exceed :func:`feed_memory_budget`.

    Args:
        nbytes (int): the bytes the feed(s) would take.
        what (str): what would take them, for the message.
        hint (str): how to make them smaller, for the message.
    """
    budget = feed_memory_budget()
    if nbytes > budget:
        raise TrtQatError(f"{what} would take {nbytes / 2**30:.3g} GiB, more than the {budget / 2**30:.3g} GiB "
                          f"input feeds may use ({FEED_BYTES_CAP / 2**30:g} GiB at most, and at most half the "
                          f"available memory); {hint}")


# ----------------------------------------------------------------------------------------------------------
# Feeds and CLI
# ----------------------------------------------------------------------------------------------------------
def make_feed(runner, batch: int | None = None, shapes: dict | None = None, seed: int = 0, count: int = 1) -> dict:
    """Random inputs for an active runner: ``shapes`` (``{name: shape}``) wins; otherwise dynamic dimension 0
    becomes ``batch`` (default 1) and other dynamic dimensions come from a TensorRT profile's opt shape.

    Floating-point inputs are standard-normal values drawn in float32 (float64 for float64 inputs) and cast to the
    input's dtype; integer inputs are uniform in [0, 127), boolean ones uniform. The same ``seed`` gives the same
    feed. A feed larger than :func:`feed_memory_budget` is refused before any array is allocated.

    Args:
        runner (BaseRunner): an active runner exposing ``input_shapes`` (and ``input_dtypes``).
        batch (int | None): the batch size for dynamic (or, with ONNX Runtime, any) dimension 0. Defaults to 1.
        shapes (dict | None): explicit shapes per input. Defaults to None.
        seed (int): random seed. Defaults to 0.
        count (int): how many such feeds the caller keeps at once (they share the memory budget). Defaults to 1.

    Returns:
        dict[str, np.ndarray]: the feed.

    Raises:
        TrtQatError: ``shapes`` names an unknown input or a shape the model does not declare, a dimension stays
            unknown, or the feed(s) would exceed the memory budget.
    """
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(runner.input_shapes))
    if unknown:
        raise TrtQatError(f"--shapes names unknown inputs {unknown}; the model's inputs are "
                          f"{list(runner.input_shapes)}")
    dtypes = getattr(runner, "input_dtypes", {})
    plan = {}
    for name, declared in runner.input_shapes.items():
        if name in shapes:
            plan[name] = tuple(int(d) for d in shapes[name])
            continue
        dims = declared_dims(declared)
        if batch is not None and dims:
            if dims[0] is not None and dims[0] != batch:
                raise TrtQatError(f"input '{name}' has a fixed batch of {dims[0]}; --batch {batch} needs a "
                                  "dynamic-batch export/engine")
            dims[0] = batch
        elif dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            if hasattr(runner, "profile_shapes"):
                opt = list(runner.profile_shapes(name)[1])
                dims = [d if d is not None else o for d, o in zip(dims, opt)]
            if any(d is None for d in dims):
                raise TrtQatError(f"input '{name}' has dynamic dimensions {list(declared)}; give its shape "
                                  f"with --shapes {name}:1x3x640x640")
        plan[name] = tuple(dims)
    if shapes:
        check_inputs(runner, plan, what="the --shapes",
                     hint="give each input a shape of its declared rank, with its fixed dimensions as declared")
    types = {name: np.dtype(dtypes.get(name, np.float32)) for name in plan}
    nbytes = count * sum(math.prod(shape) * types[name].itemsize for name, shape in plan.items())
    listed = ", ".join(f"{n}:{'x'.join(map(str, s))} {types[n].name}" for n, s in plan.items())
    check_feed_bytes(nbytes, f"{count} random feeds of {listed}" if count > 1 else f"the random feed {listed}",
                     "use a smaller batch or shape (--batch, --shapes)" + (" or fewer inputs (--num-inputs)"
                                                                          if count > 1 else ""))
    rng = np.random.default_rng(seed)
    return {name: _random_array(rng, shape, types[name]) for name, shape in plan.items()}


def _random_array(rng, shape, dtype: np.dtype) -> np.ndarray:
    """Random values of ``dtype`` drawn directly in that dtype (float16: in float32), never through float64."""
    if dtype.kind == "f":
        drawn = dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)
        return rng.standard_normal(shape, dtype=drawn).astype(dtype, copy=False)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape, dtype=np.bool_)
    return rng.integers(0, 127, size=shape, dtype=dtype)
