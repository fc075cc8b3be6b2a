"""Sensitivity output: the Markdown table, the bar chart and the report section."""
from fixtures_sensitivity import hostile_model, sqnr_fn

from trt_qat.analysis.format import format_table, plot_sensitivity, sensitivity_section
from trt_qat.analysis.sensitivity import layer_sensitivity


def test_both_modes_and_table_and_plot(tmp_path):
    model = hostile_model()
    results = layer_sensitivity(model, sqnr_fn(model), "both", progress=False)
    assert [r["mode"] for r in results] == ["leave-one-out"] * 6 + ["only-one"] * 6
    table = format_table(results, "dB")
    lines = table.splitlines()
    assert "leave-one-out Δ (dB)" in lines[0] and "only-one Δ (dB)" in lines[0]
    assert len(lines) == 2 + 6 and lines[2].startswith("| 1 | `c2` |")
    png = plot_sensitivity(results, tmp_path / "s.png", unit="dB")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_sensitivity_section_and_empty_results():
    results = [{"layer": "a", "mode": "leave-one-out", "score": 0.5, "delta": 0.25, "baseline": 0.25},
               {"layer": "b", "mode": "leave-one-out", "score": 0.3, "delta": 0.05, "baseline": 0.25}]
    heading, text = sensitivity_section(results, top=1, unit="mAP")
    assert heading == "Quantization sensitivity"
    assert text.splitlines() == ["leave-one-out:", f"   1. {'a':<40} score 0.5  Δ +0.25 mAP"]
    assert sensitivity_section([])[1] == format_table([]) == "(no layers evaluated)"
