"""Compare backends on the same inputs: ``python -m trt_qat.compare`` (also ``trt-qat compare``).

The first runner is the reference; every other runner's outputs are compared with it, output by output:
max-abs and mean-abs difference and cosine similarity. A pair disagrees when the cosine similarity falls below
the threshold (0.999 by default) or an absolute difference exceeds an optional limit. This is the check for
"the engine lost accuracy": run the fake-quant model, ONNX Runtime on the Q/DQ ONNX, and the engine, on the same
inputs, and see which step diverges.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from trt_qat.errors import TrtQatError
from trt_qat.measure.benchmark import check_feed_bytes
from trt_qat.runners.base import check_inputs

__all__ = ["compare_outputs", "compare_runners", "format_report", "load_npz_feed", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = {"cosine": 0.999, "max_abs": None, "mean_abs": None}


def _thresholds(thresholds) -> dict:
    th = dict(DEFAULT_THRESHOLDS)
    if thresholds:
        unknown = set(thresholds) - set(th)
        if unknown:
            raise TrtQatError(f"unknown comparison thresholds {sorted(unknown)}; use {sorted(th)}")
        th.update({k: v for k, v in thresholds.items() if v is not None or k != "cosine"})
    return th


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    with np.errstate(over="ignore"):
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if not (math.isfinite(na) and math.isfinite(nb)):  # finite values too large to square: scale them first
        scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
        a, b = a / scale, b / scale
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def compare_outputs(ref: dict, test: dict, thresholds: dict | None = None) -> list:
    """Compare two output dicts ``{name: array}`` output by output.

    Args:
        ref (dict): the reference outputs.
        test (dict): the outputs under test.
        thresholds (dict | None): ``cosine`` (minimum, default 0.999), ``max_abs`` and ``mean_abs`` (maxima,
            default None = not checked).

    Returns:
        list[dict]: one dict per reference output: ``output, shape, max_abs, mean_abs, cosine, ok`` and, when
        it fails, ``reason``.
    """
    th = _thresholds(thresholds)
    rows = []
    for name, r in ref.items():
        row = {"output": name, "shape": list(np.shape(r))}
        if name not in test:
            row.update(max_abs=None, mean_abs=None, cosine=None, ok=False, reason="missing in the tested outputs")
            rows.append(row)
            continue
        t = test[name]
        if np.shape(r) != np.shape(t):
            row.update(max_abs=None, mean_abs=None, cosine=None, ok=False,
                       reason=f"shape {list(np.shape(t))} differs from the reference's {list(np.shape(r))}")
            rows.append(row)
            continue
        a = np.asarray(r, dtype=np.float64).ravel()
        b = np.asarray(t, dtype=np.float64).ravel()
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            row.update(max_abs=None, mean_abs=None, cosine=None, ok=False, reason="non-finite values (NaN/Inf)")
            rows.append(row)
            continue
        diff = np.abs(a - b)
        row.update(max_abs=float(diff.max()) if diff.size else 0.0, mean_abs=float(diff.mean()) if diff.size else 0.0,
                   cosine=_cosine(a, b))
        reasons = []
        if row["cosine"] < th["cosine"]:
            reasons.append(f"cosine {row['cosine']:.6f} < {th['cosine']}")
        if th["max_abs"] is not None and row["max_abs"] > th["max_abs"]:
            reasons.append(f"max_abs {row['max_abs']:.4g} > {th['max_abs']}")
        if th["mean_abs"] is not None and row["mean_abs"] > th["mean_abs"]:
            reasons.append(f"mean_abs {row['mean_abs']:.4g} > {th['mean_abs']}")
        row["ok"] = not reasons
        if reasons:
            row["reason"] = "; ".join(reasons)
        rows.append(row)
    return rows


def compare_runners(runners, feeds, thresholds: dict | None = None) -> dict:
    """Run every runner on every feed and compare each with the first (the reference).

    Args:
        runners (list[BaseRunner]): at least two runners; the first is the reference. Activated here if needed.
        feeds (Iterable[dict]): input dicts (one query each).
        thresholds (dict | None): see :func:`compare_outputs`.

    Returns:
        dict: ``reference``, ``runners``, ``thresholds``, ``n_feeds``, ``pairs`` (per tested runner: ``outputs``
        aggregated over feeds: worst max_abs, average mean_abs, lowest cosine; and ``ok``) and ``ok`` overall.

    Raises:
        TrtQatError: fewer than two runners, duplicate names, no feeds, or a feed that one of the runners'
            declared inputs cannot take (checked before that feed runs anywhere, see :func:`check_inputs`).
    """
    runners = list(runners)
    if len(runners) < 2:
        raise TrtQatError("compare needs at least two runners (a reference and one to test)")
    th = _thresholds(thresholds)
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise TrtQatError(f"runner names must be unique to tell them apart in the report, got {names}")
    activated = [r for r in runners if not r.is_active]
    for r in activated:
        r.activate()
    agg = {r.name: OrderedDict() for r in runners[1:]}
    n = 0
    try:
        for feed in feeds:
            n += 1
            if isinstance(feed, dict):
                for r in runners:
                    check_inputs(r, {k: np.shape(v) for k, v in feed.items()},
                                 {k: v.dtype for k, v in feed.items() if hasattr(v, "dtype")}, what=f"feed {n}",
                                 hint="give arrays of the shapes and dtypes every compared model declares")
            ref = runners[0].infer(feed)
            for r in runners[1:]:
                for row in compare_outputs(ref, r.infer(feed), th):
                    acc = agg[r.name].setdefault(row["output"], {"output": row["output"], "shape": row["shape"],
                                                                 "max_abs": 0.0, "mean_abs": [], "cosine": 1.0,
                                                                 "ok": True, "reasons": []})
                    if row["max_abs"] is None:
                        acc["max_abs"] = acc["cosine"] = None
                    elif acc["max_abs"] is not None:
                        acc["max_abs"] = max(acc["max_abs"], row["max_abs"])
                        acc["cosine"] = min(acc["cosine"], row["cosine"])
                        acc["mean_abs"].append(row["mean_abs"])
                    if not row["ok"]:
                        acc["ok"] = False
                        if row.get("reason") and row["reason"] not in acc["reasons"]:
                            acc["reasons"].append(row["reason"])
    finally:
        for r in activated:
            r.deactivate()
    if n == 0:
        raise TrtQatError("compare got no inputs; give --inputs FILE.npz or --num-inputs N >= 1")
    pairs = []
    for name, outputs in agg.items():
        rows = []
        for acc in outputs.values():
            acc["mean_abs"] = float(np.mean(acc["mean_abs"])) if acc["mean_abs"] else None
            acc["reason"] = "; ".join(acc.pop("reasons")[:3])
            if acc["ok"]:
                acc.pop("reason")
            rows.append(acc)
        pairs.append({"reference": names[0], "test": name, "outputs": rows, "ok": all(x["ok"] for x in rows)})
    return {"reference": names[0], "runners": names, "thresholds": th, "n_feeds": n, "pairs": pairs,
            "ok": all(p["ok"] for p in pairs)}


def format_report(report: dict) -> str:
    """A plain-text table of a :func:`compare_runners` report."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"reference: {report['reference']}   inputs: {report['n_feeds']}   "
             f"threshold: cosine >= {report['thresholds']['cosine']}"
             + (f", max_abs <= {report['thresholds']['max_abs']}" if report["thresholds"]["max_abs"] else "")
             + (f", mean_abs <= {report['thresholds']['mean_abs']}" if report["thresholds"]["mean_abs"] else "")]
    header = f"{'runner':<16} {'output':<24} {'max_abs':>12} {'mean_abs':>12} {'cosine':>10}  result"
    lines += [header, "-" * len(header)]
    for pair in report["pairs"]:
        for row in pair["outputs"]:
            verdict = "ok" if row["ok"] else f"DISAGREES ({row.get('reason', '')})"
            lines.append(f"{pair['test']:<16} {row['output']:<24} {num(row['max_abs'], '12.5g')} "
                         f"{num(row['mean_abs'], '12.5g')} {num(row['cosine'], '10.6f')}  {verdict}")
    lines.append("all runners agree" if report["ok"] else "DISAGREEMENT beyond thresholds (see above)")
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"


def _npz_member(data, key: str) -> str:
    return next((m for m in data.zip.namelist() if m in (key, f"{key}.npy")), key)


def _npz_header(data, key: str):
    """``(shape, dtype)`` an ``.npz`` array declares in its header, read without loading the array."""
    from numpy.lib import format as npy_format

    with data.zip.open(_npz_member(data, key)) as f:
        version = npy_format.read_magic(f)
        reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _fortran, dtype = reader(f)
    return tuple(shape), np.dtype(dtype)


def load_npz_feed(path, input_names) -> dict:
    """Read one feed from an ``.npz`` whose keys are the input names (a single unnamed ``arr_0`` maps to the
    single input). The arrays' headers are checked before any array is loaded.

    Args:
        path (str | Path): the ``.npz`` (``np.savez``/``np.savez_compressed``).
        input_names (Sequence[str]): the model's inputs.

    Returns:
        dict[str, np.ndarray]: ``{input name: array}``.

    Raises:
        TrtQatError: the file is missing, corrupt, not an ``.npz`` or holds pickled objects; it lacks an input;
            an input's array is not numeric (bool, int or float); or the arrays exceed the memory budget
            (:func:`~trt_qat.measure.benchmark.feed_memory_budget`).
    """
    import zipfile
    import zlib

    fix = "give an .npz saved with np.savez, one numeric array per model input"
    unreadable = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, MemoryError)
    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r")  # (a .npy is mapped, not read)
    except unreadable as exc:
        raise TrtQatError(f"cannot read inputs '{path}' ({_one_line(exc)}); {fix}") from None
    if not hasattr(data, "files"):
        raise TrtQatError(f"cannot read inputs '{path}': it is a single .npy array, not an .npz; {fix}")
    with data:
        keys = {input_names[0]: "arr_0"} if data.files == ["arr_0"] and len(input_names) == 1 else {}
        missing = [n for n in input_names if n not in keys and n not in data.files]
        if missing:
            raise TrtQatError(f"'{path}' lacks inputs {missing} (its keys are {sorted(data.files)}); {fix}")
        keys = {n: keys.get(n, n) for n in input_names}
        try:
            headers = {n: _npz_header(data, k) for n, k in keys.items()}
            for name, (shape, dtype) in headers.items():
                if dtype.kind not in "biuf":
                    raise TrtQatError(f"'{path}' holds input '{name}' as a non-numeric array (dtype {dtype}, shape "
                                      f"{list(shape)}); {fix}")
            check_feed_bytes(sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values()),
                             f"the arrays of '{path}'", "give smaller arrays (fewer or smaller images)")
            return {n: data[k] for n, k in keys.items()}
        except unreadable as exc:
            raise TrtQatError(f"cannot read inputs '{path}' ({_one_line(exc)}): it is corrupt; {fix}") from None
