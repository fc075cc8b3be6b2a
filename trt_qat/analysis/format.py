"""Tables, charts and report sections of :func:`trt_qat.analysis.sensitivity.layer_sensitivity` results."""
from __future__ import annotations

import math
from pathlib import Path

from trt_qat.analysis.sensitivity import MODES
from trt_qat.errors import TrtQatError

__all__ = ["format_table", "plot_sensitivity", "sensitivity_section"]


def _by_layer(results):
    """``(modes present in results, {layer: {mode: result}})``."""
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    rows = {}
    for r in results:
        rows.setdefault(r["layer"], {})[r["mode"]] = r
    return modes, rows


def format_table(results, unit: str = "") -> str:
    """A Markdown table, one row per layer (ranked by the first mode's delta), score and delta per mode."""
    if not results:
        return "(no layers evaluated)"
    modes, rows = _by_layer(results)
    suffix = f" ({unit})" if unit else ""
    head = ["rank", "layer"] + [h for m in modes for h in (f"{m} score{suffix}", f"{m} Δ{suffix}")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    first = modes[0]
    order = sorted(rows, key=lambda n: -rows[n][first]["delta"] if first in rows[n] else math.inf)
    for rank, name in enumerate(order, 1):
        cells = [str(rank), f"`{name}`"]
        for m in modes:
            r = rows[name].get(m)
            cells += [f"{r['score']:.5g}", f"{r['delta']:+.4g}"] if r else ["n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sensitivity(results, path, unit: str = "", title: str = "Per-layer quantization sensitivity") -> Path:
    """Write a horizontal bar chart of each layer's delta (one panel per mode), PNG, atomically.

    Args:
        results (list[dict]): :func:`trt_qat.analysis.sensitivity.layer_sensitivity` results.
        path (str | Path): the PNG to write.
        unit (str): the metric's unit for the axis label. Defaults to "".
        title (str): Defaults to "Per-layer quantization sensitivity".

    Returns:
        Path: ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trt_qat.fileio import atomic_path

    if not results:
        raise TrtQatError("no sensitivity results to plot; run layer_sensitivity first")
    modes, rows = _by_layer(results)
    n = max(len([r for r in results if r["mode"] == m]) for m in modes)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), max(3.0, 0.22 * n + 1.2)), squeeze=False)
    for ax, m in zip(axes[0], modes):
        part = sorted((r for r in results if r["mode"] == m), key=lambda r: -r["delta"])
        ys = range(len(part))
        colors = ["#c0392b" if r["delta"] > 0 else "#7f8c8d" for r in part]
        ax.barh(list(ys), [r["delta"] for r in part], color=colors)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([r["layer"] for r in part], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.6)
        what = "score - all quantized" if m == "leave-one-out" else "FP32 - score"
        ax.set_xlabel(f"Δ = {what}" + (f" ({unit})" if unit else ""))
        ax.set_title(f"{m} (most sensitive on top)", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def sensitivity_section(results, top: int = 10, unit: str = "") -> tuple:
    """``(heading, text)`` for :func:`trt_qat.report.write_report`'s ``sections``: the top layers per mode."""
    lines = []
    for m in MODES:
        part = [r for r in results if r["mode"] == m][:top]
        if part:
            lines.append(f"{m}:")
            lines += [f"  {i:>2}. {r['layer']:<40} score {r['score']:.5g}  Δ {r['delta']:+.4g}{unit and ' ' + unit}"
                      for i, r in enumerate(part, 1)]
    return "Quantization sensitivity", "\n".join(lines) or "(no layers evaluated)"
