"""`trt-qat run` with `prune:`: the extra rows, the section that says 2:4 gives no ONNX Runtime
speed, and a config without them untouched."""
import json
from pathlib import Path

import pytest
import yaml

from trt_qat.cli.run import main as run_main
from trt_qat.config import PipelineConfig, load_pipeline_config
from trt_qat.data.digits_det import generate_digits_det
from trt_qat.errors import TrtQatError
from trt_qat.models.yolo import build_model, save_checkpoint

pytest.importorskip("torch_pruning")
DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")


def test_demo_config_enables_neither(tmp_path):
    cfg = load_pipeline_config(DEMO)
    assert cfg.prune.target_macs is None and not cfg.sparsity.enabled
    assert "prune" not in cfg.to_dict() and "sparsity" not in cfg.to_dict()  # the run's fingerprint is unchanged
    assert set(PipelineConfig().to_dict()) == {"model", "data", "quant", "calib", "qat", "export", "run"}


@pytest.mark.parametrize("override, msg", [({"prune.target_macs": 1.5}, r"prune.target_macs=1.5 must be in \(0, 1\]"),
                                           ({"prune.keep": ["("]}, "not a valid regex"),
                                           ({"prune.importance": "taylor"}, "unknown"),
                                           ({"sparsity.min_channels": 2}, "min_channels must be >= 4")])
def test_bad_sections(override, msg):
    with pytest.raises(TrtQatError, match=msg):
        load_pipeline_config(DEMO, override)


@pytest.mark.slow
def test_pipeline_with_a_pruned_variant(tmp_path, monkeypatch, capsys):
    import trt_qat.pipeline

    monkeypatch.chdir(tmp_path)
    # (latency is measured for real by the ablation benchmark and the plain pipeline test; here it only costs time)
    monkeypatch.setattr(trt_qat.pipeline, "_ort_latency", lambda path, threads: {
        "latency_ms_p50": 1.0, "latency_ms_p99": 1.0, "qps": 1000.0})
    data = generate_digits_det(tmp_path / "data", n_train=8, n_val=4, n_calib=4, seed=1)
    save_checkpoint(build_model("yolo-n"), tmp_path / "fp32.pt")
    cfg = {
        "model": {"checkpoint": str(tmp_path / "fp32.pt")},
        "data": {"data": str(data), "batch_size": 4, "imgsz": 64},
        "export": {"imgsz": 64},
        "qat": {"epochs": 1, "max_steps_per_epoch": 1},
        "run": {"name": "ps", "out_dir": "reports", "calib_methods": ["max"], "threads": 1, "sensitivity": False},
        # (fine-tuning is tested on its own: tests/prune/test_cli.py)
        "prune": {"target_macs": 0.6, "finetune_epochs": 0},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run_main(["--config", "cfg.yaml"]) == 0
    report = json.loads((tmp_path / "reports" / "ps" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"] if r["backend"] == "onnxruntime-cpu"}
    for name in ("pruned FP32", "pruned QAT"):  # (the 2:4 rows come from the same run_variant: test_prune_ablation)
        assert rows[name]["latency_ms_p50"] > 0 and "GMACs" in rows[name]["notes"], name
    ps = report["meta"]["summary"]["prune_sparsity"]
    assert ps["pruned"]["gmacs"] < ps["baseline"]["gmacs"] and ps["pruned"]["params"] < ps["baseline"]["params"]
    assert ps["pruned"]["lint_qat"]["reformat_sites"] == 0
    md = (tmp_path / "reports" / "ps" / "report.md").read_text()
    assert "Pruning and 2:4 sparsity" in md and "2:4 sparsity gives no speed in ONNX Runtime" in md


@pytest.mark.parametrize("section, msg", [({"prune": {"target_macs": 0.6, "keep": ["nomatchxyz"]}},
                                           "prune.keep 'nomatchxyz' matches no conv"),
                                          ({"sparsity": {"enabled": True, "min_channels": 100000}},
                                           "sparsity.min_channels=100000: no conv")])
def test_a_section_that_cannot_work_is_refused_before_the_run(section, msg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = generate_digits_det(tmp_path / "data", n_train=2, n_val=2, n_calib=2, seed=1)
    save_checkpoint(build_model("yolo-n"), tmp_path / "fp32.pt")
    cfg = {"model": {"checkpoint": str(tmp_path / "fp32.pt")}, "data": {"data": str(data), "imgsz": 64},
           "run": {"name": "bad", "out_dir": "reports"}, **section}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        run_main(["--config", "cfg.yaml"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("trt_qat: error:")]
    assert exc.value.code == 2 and len(err) == 1 and msg in err[0]
    assert not (tmp_path / "reports" / "bad" / "artifacts").exists()  # nothing of the baseline was run
