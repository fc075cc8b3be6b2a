"""benchmarks/prune_ablation.py on a tiny setting: one run, one table (figures not asserted; the 2:4 variant only,
the pruned variants run through the same ``run_variant`` in tests/prune/test_pipeline_variants.py)."""
from __future__ import annotations

import json
import os
import sys

import pytest

from trt_qat.data.digits_det import generate_digits_det
from trt_qat.models.yolo import build_model, save_checkpoint

pytest.importorskip("torch_pruning")
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


@pytest.mark.slow
def test_prune_ablation_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(BENCH)
    import prune_ablation

    data = generate_digits_det(tmp_path / "data", n_train=8, n_val=4, n_calib=4, seed=1)
    save_checkpoint(build_model("yolo-n"), tmp_path / "fp32.pt")
    out = tmp_path / "rows.json"
    assert prune_ablation.main([
        "--set", f"model.checkpoint={tmp_path / 'fp32.pt'}", f"data.data={data}", "data.imgsz=64",
        "data.batch_size=4", f"run.out_dir={tmp_path / 'reports'}", "run.threads=1",
        "--targets", "--epochs", "1", "--max-steps", "1", "--min-channels", "128",
        "--latency-imgsz", "64", "--latency-rounds", "1", "--latency-iters", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| FP32 |" in printed and "| 2:4 |" in printed and "no speed in ONNX Runtime" in printed
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["FP32", "2:4"]  # (the pruned rows: tests/prune/test_pipeline_variants.py)
    assert rows[1]["gmacs"] == pytest.approx(rows[0]["gmacs"]) and rows[1]["params"] == rows[0]["params"]
    assert rows[1]["lint"]["sparsity"]["ready_fraction_of_eligible"] == pytest.approx(1.0)
    assert all(r["latency_ms"] > 0 for r in rows)
    del sys.modules["prune_ablation"]
