"""One tiny end-to-end run of `trt-qat run`: every stage, every report row, nothing half-written."""
import json

import pytest
import yaml

from trt_qat.cli.run import main as run_main
from trt_qat.data.digits_det import generate_digits_det
from trt_qat.models.yolo import build_model, save_checkpoint


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = generate_digits_det(tmp_path / "data", n_train=16, n_val=8, n_calib=8, seed=1)
    save_checkpoint(build_model("yolo-n"), tmp_path / "fp32.pt")
    cfg = {
        "model": {"checkpoint": str(tmp_path / "fp32.pt")},
        "data": {"data": str(data), "batch_size": 8},
        "qat": {"epochs": 1, "max_steps_per_epoch": 2},
        "run": {"name": "e2e", "out_dir": "reports", "calib_methods": ["max", "entropy"], "threads": 1,
                "sensitivity": True},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run_main(["--config", "cfg.yaml"]) == 0
    assert "report: reports/e2e/report.md" in capsys.readouterr().out

    out = tmp_path / "reports" / "e2e"
    for name in ("report.md", "report.json", "report.html", "map_by_variant.png", "latency_vs_map.png",
                 "sensitivity.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    variants = {(r["variant"], r["backend"]) for r in report["rows"]}
    assert {("FP32", "torch"), ("PTQ-max", "torch"), ("PTQ-entropy", "torch"), ("QAT", "torch"),
            ("FP32", "onnxruntime-cpu"), ("QAT", "onnxruntime-cpu")} <= variants
    for row in report["rows"]:
        assert 0.0 <= row["map50_95"] <= 1.0
        if row["backend"] == "onnxruntime-cpu":
            assert row["latency_ms_p50"] > 0 and row["size_mb"] > 0
    summary = report["meta"]["summary"]
    assert summary["torch_vs_ort"]["cosine_min"] >= 0.999
    assert summary["lint"]["requantize_chains"] == 0
    versions = report["meta"]["versions"]
    assert versions["pytorch_quantization"] == "2.1.3" and "onnxruntime" in versions
    assert (tmp_path / "calib" / "e2e" / "amax.pt").is_file()
    assert (tmp_path / "calib" / "e2e" / "calib_images.txt").read_text().count("\n") == 8
    html = (out / "report.html").read_text()
    assert html.count("<img") == 3 and "Quantization sensitivity" in html
    assert "TensorRT rows (FP32/FP16/INT8 engines)" in (out / "report.md").read_text()
    assert "sensitivity.png" in (out / "report.md").read_text()
    leftovers = [p for p in tmp_path.rglob("*.tmp")]
    assert not leftovers


def test_pipeline_bad_config_key(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("qat:\n  epochz: 3\n")
    with pytest.raises(SystemExit) as exc:
        run_main(["--config", str(tmp_path / "cfg.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'qat.epochz'" in err[0] and "epochs" in err[0]


def test_pipeline_missing_dataset(tmp_path, capsys):
    save_checkpoint(build_model("yolo-n"), tmp_path / "fp32.pt")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "model": {"checkpoint": str(tmp_path / "fp32.pt")}, "data": {"data": str(tmp_path / "nope/data.yaml")},
        "run": {"out_dir": str(tmp_path / "r")}}))
    with pytest.raises(SystemExit) as exc:
        run_main(["--config", str(tmp_path / "cfg.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope/data.yaml" in err[0]


def test_pipeline_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"run": {"out_dir": str(blocker / "sub")}}))
    with pytest.raises(SystemExit) as exc:
        run_main(["--config", str(tmp_path / "cfg.yaml")])
    assert exc.value.code == 2
    assert "cannot be written" in capsys.readouterr().err


def test_pipeline_model_name_must_match_the_checkpoint(tmp_path, capsys, tiny_digits_yaml):
    save_checkpoint(build_model("yolo-n"), tmp_path / "fp32.pt")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "model": {"name": "yolo-s", "checkpoint": str(tmp_path / "fp32.pt")},
        "data": {"data": str(tiny_digits_yaml)}, "run": {"out_dir": str(tmp_path / "r")}}))
    with pytest.raises(SystemExit) as exc:
        run_main(["--config", str(tmp_path / "cfg.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds yolo-n, but model.name is yolo-s" in err[0], err


def test_pipeline_with_distillation_variants(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = generate_digits_det(tmp_path / "data", n_train=16, n_val=8, n_calib=8, seed=1)
    save_checkpoint(build_model("yolo-n"), tmp_path / "fp32.pt")
    cfg = {
        "model": {"checkpoint": str(tmp_path / "fp32.pt")},
        "data": {"data": str(data), "batch_size": 8, "imgsz": 64},
        "qat": {"epochs": 1, "max_steps_per_epoch": 2, "distill": {"mode": "both", "label_free": True}},
        "run": {"name": "kd", "out_dir": "reports", "calib_methods": ["max"], "threads": 1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run_main(["--config", "cfg.yaml"]) == 0
    report = json.loads((tmp_path / "reports" / "kd" / "report.json").read_text())
    variants = {(r["variant"], r["backend"]) for r in report["rows"]}
    for variant in ("QAT distill-both", "QAT label-free"):
        assert {(variant, "torch"), (variant, "onnxruntime-cpu")} <= variants
    distill = report["meta"]["summary"]["distill"]
    assert distill["QAT label-free"]["best_epoch_by"].startswith("held-out distillation loss")
    assert distill["QAT distill-both"]["best_epoch_by"] == "val mAP50-95"
    assert (tmp_path / "reports" / "kd" / "artifacts" / "model_qat_label_free_qdq.onnx").is_file()
