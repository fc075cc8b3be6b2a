"""Comparison reports: one row per variant (backend x precision x calibration), written as Markdown, JSON,
PNG plots and a self-contained HTML page (plots embedded, opens offline).

A row is a dict with any of these keys: ``variant``, ``backend``, ``precision``, ``batch``, ``map50``,
``map50_95``, ``latency_ms_p50``, ``latency_ms_p99``, ``qps``, ``size_mb``, ``notes``. Missing values are shown as
"n/a", never invented. ``delta_map50_95`` is computed against the row whose variant is "FP32"
(PyTorch) when present. A non-finite number (NaN, Infinity) is missing too: "n/a" in Markdown and HTML, ``null``
in report.json (strict JSON, which has no NaN).

:func:`load_rows` refuses a JSON file that holds no report rows: each row needs a name (``variant``, or ``model``
for a `trt-qat bench` result) and at least one metric (:data:`METRIC_KEYS`, or a bench result's
``Throughput (qps)``).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from trt_qat.errors import TrtQatError
from trt_qat.fileio import atomic_path, atomic_write_json, atomic_write_text, ensure_dir, json_safe

__all__ = ["write_report", "report_files", "format_markdown_table", "pareto_front", "load_rows", "merge_rows",
           "METRIC_KEYS", "REPORT_FILES"]

#: the numbers a row may carry; a row needs at least one of them (a bench result: its ``Throughput (qps)``)
METRIC_KEYS = ("map50", "map50_95", "latency_ms_p50", "latency_ms_p99", "qps", "size_mb")
#: the files :func:`write_report` writes into its output directory (the plots only when there is data for them)
REPORT_FILES = ("report.md", "report.json", "report.html", "map_by_variant.png", "latency_vs_map.png")

COLUMNS = [
    ("variant", "variant"), ("backend", "backend"), ("precision", "precision"), ("batch", "batch"),
    ("map50", "mAP50"), ("map50_95", "mAP50-95"), ("delta_map50_95", "Δ mAP50-95 vs FP32 (pts)"),
    ("latency_ms_p50", "latency p50 (ms)"), ("latency_ms_p99", "latency p99 (ms)"), ("qps", "qps"),
    ("size_mb", "size (MB)"), ("notes", "notes"),
]


def _fmt(key, value) -> str:
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if key in ("map50", "map50_95"):
        return f"{value:.4f}"
    if key == "delta_map50_95":
        return f"{value:+.2f}"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    return str(value)


def _with_deltas(rows):
    ref = next((r for r in rows if r.get("variant") == "FP32" and r.get("map50_95") is not None), None)
    out = []
    for r in rows:
        r = dict(r)
        if ref is not None and r.get("map50_95") is not None:
            r["delta_map50_95"] = 100.0 * (r["map50_95"] - ref["map50_95"])
        out.append(r)
    return out


def format_markdown_table(rows) -> str:
    rows = _with_deltas(rows)
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def pareto_front(points):
    """Indices of points (latency, accuracy) not dominated by another (lower latency and higher accuracy)."""
    front = []
    for i, (lat_i, acc_i) in enumerate(points):
        dominated = any((lat_j <= lat_i and acc_j >= acc_i) and (lat_j < lat_i or acc_j > acc_i)
                        for j, (lat_j, acc_j) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plots(rows):
    """Return {filename: png bytes}: mAP by variant, and latency vs mAP50-95 with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    scored = [r for r in rows if r.get("map50_95") is not None]
    if scored:
        labels = [f"{r.get('variant', '?')}\n{r.get('backend', '')}" for r in scored]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(scored)), 4))
        xs = range(len(scored))
        ax.bar([x - 0.2 for x in xs], [r.get("map50") or 0 for r in scored], width=0.4, label="mAP50")
        ax.bar([x + 0.2 for x in xs], [r["map50_95"] for r in scored], width=0.4, label="mAP50-95")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("mAP")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("Accuracy by variant")
        plots["map_by_variant.png"] = _png_bytes(fig)
        plt.close(fig)
    timed = [r for r in scored if r.get("latency_ms_p50")]
    if timed:
        pts = [(r["latency_ms_p50"], r["map50_95"]) for r in timed]
        front = pareto_front(pts)
        fig, ax = plt.subplots(figsize=(6, 4))
        for r, (x, y) in zip(timed, pts):
            ax.scatter([x], [y])
            ax.annotate(f"{r.get('variant')} ({r.get('backend')})", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel("latency p50 (ms, batch 1)")
        ax.set_ylabel("mAP50-95")
        ax.legend()
        ax.set_title("Latency vs accuracy")
        plots["latency_vs_map.png"] = _png_bytes(fig)
        plt.close(fig)
    return plots


def _html(title, rows, meta, plots, sections) -> str:
    rows = _with_deltas(rows)
    th = "".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(k, r.get(k)))}</td>" for k, _ in COLUMNS) + "</tr>"
                  for r in rows)
    imgs = "".join(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(data).decode()}"/><figcaption>{html.escape(name)}</figcaption></figure>'
                   for name, data in plots.items())
    extra = "".join(f"<h2>{html.escape(h)}</h2><pre>{html.escape(body)}</pre>" for h, body in sections)
    meta_pre = html.escape(json.dumps(json_safe(meta), indent=2, default=str))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;font-size:13px}th{background:#eee}figure{display:inline-block;margin:1em}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><table><tr>{th}</tr>{trs}</table>"
            f"{imgs}{extra}<h2>Run configuration and versions</h2><pre>{meta_pre}</pre></body></html>\n")


def report_files(out_dir) -> list:
    """The paths :func:`write_report` may write in ``out_dir`` (to refuse an output that is an input first)."""
    return [Path(out_dir) / name for name in REPORT_FILES]


def write_report(rows, out_dir, meta: dict | None = None, title: str = "trt_qat report",
                 sections: list | None = None, images: list | None = None) -> Path:
    """Write report.md, report.json, report.html and PNG plots into ``out_dir``; returns the report.md path.
    Non-finite numbers (NaN, Infinity) are shown as missing: "n/a", and ``null`` in the strict-JSON report.json.

    Args:
        rows (list[dict]): one dict per variant (see module docstring).
        out_dir (str): output directory (created).
        meta (dict): run configuration, versions, notes. Defaults to {}.
        title (str): Defaults to "trt_qat report".
        sections (list[tuple[str, str]]): extra (heading, preformatted text) sections, e.g. a lint summary.
        images (list[str]): extra PNG files (e.g. a sensitivity chart) to link and embed. Defaults to none.
    """
    out = ensure_dir(out_dir)
    rows, meta = json_safe(list(rows)), json_safe(meta or {})
    sections = sections or []
    plots = _plots(rows)
    for name, data in plots.items():
        with atomic_path(out / name) as tmp:
            Path(tmp).write_bytes(data)
    for img in images or []:
        img = Path(img)
        plots[img.name if img.parent.resolve() == out.resolve() else str(img)] = img.read_bytes()
    md = [f"# {title}", "", format_markdown_table(rows), ""]
    md += [f"![{name}]({name})" for name in plots]
    for heading, body in sections:
        md += ["", f"## {heading}", "", "```", body.rstrip(), "```"]
    md += ["", "## Run configuration and versions", "", "```json", json.dumps(meta, indent=2, default=str), "```", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_json(out / "report.json", json_safe({"title": title, "rows": _with_deltas(rows), "meta": meta,
                                                      "sections": dict(sections)}))
    atomic_write_text(out / "report.html", _html(title, rows, meta, plots, sections))
    return out / "report.md"


def load_rows(path: Path):
    """The report rows of one JSON file (an eval, bench or report JSON); one TrtQatError when it holds none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrtQatError(f"cannot read '{path}' as JSON ({exc.__class__.__name__}); pass eval/bench JSON files "
                          "written by trt-qat") from None
    if isinstance(data, dict) and "rows" in data:
        rows = data["rows"]
    elif isinstance(data, list):
        rows = data
    elif isinstance(data, dict):
        rows = [data]
    else:
        rows = None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise TrtQatError(f"'{path}' holds no report rows (objects with variant/map50_95/latency fields); pass "
                          "eval/bench JSON files written by trt-qat")
    for i, row in enumerate(rows, start=1):
        _check_row(path, i, row)
    return rows


def _check_row(path, i: int, raw: dict) -> None:
    """Refuse a row with no name or no metric (an unrelated JSON object), or with a metric that is not a number."""
    row = _from_bench(raw) if _is_bench(raw) else raw
    for key in METRIC_KEYS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TrtQatError(f"'{path}': {key} = {value!r} is not a number; pass eval/bench JSON files "
                              "written by trt-qat")
    name = row.get("variant")
    if not isinstance(name, str) or not name.strip() or not any(key in row for key in METRIC_KEYS):
        keys = ", ".join(sorted(map(str, raw))[:8]) or "none"
        raise TrtQatError(f"'{path}': row {i} is not a report row (keys: {keys}): a row needs a variant name and "
                          f"at least one metric ({', '.join(METRIC_KEYS)}), a bench result its model and "
                          "Throughput (qps); pass eval/bench JSON files written by trt-qat")


_BACKENDS = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "onnxruntime-cpu": "onnxruntime",
             "trt": "tensorrt", "tensorrt": "tensorrt", "torch": "torch"}


def _is_bench(row: dict) -> bool:
    return "Throughput (qps)" in row


def _from_bench(result: dict) -> dict:
    """A report row from a `trt-qat bench --exportJson` result (latency of batch ``batch``); the variant is the
    model file's stem (None without a model)."""
    s = result.get("summary")
    s = s if isinstance(s, dict) else {}
    model = result.get("model")
    named = isinstance(model, str) and model.strip()
    return {"variant": Path(model).stem if named else None, "backend": result.get("backend"),
            "batch": result.get("batch"), "latency_ms_p50": s.get("latency_ms_median"),
            "latency_ms_p99": s.get("latency_ms_p99"), "qps": s.get("qps", result.get("Throughput (qps)"))}


def merge_rows(rows):
    """Merge rows of the same model on the same backend family: e.g. `trt-qat eval --json` (mAP) and
    `trt-qat bench --exportJson` (latency) results of one ONNX file or engine become one row."""
    merged = {}
    for r in rows:
        if _is_bench(r):
            r = _from_bench(r)
        key = (r.get("variant"), _BACKENDS.get(r.get("backend"), r.get("backend")))
        row = merged.setdefault(key, {})
        for k, v in r.items():
            if v is not None and not (k == "precision" and "precision" in row):
                row[k] = v
    return list(merged.values())
