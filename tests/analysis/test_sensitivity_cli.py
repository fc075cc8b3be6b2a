"""`trt-qat sensitivity`: the sqnr and mAP metrics, auto-skip, the written files and errors."""
import json

import pytest
import yaml

import trt_qat
from trt_qat.analysis.metrics import SQNR_CAP_DB
from trt_qat.cli.sensitivity import main


def test_cli_sqnr_with_auto_skip(calibrated, capsys):
    root, data, ckpt, n_layers = calibrated
    out = root / "out_sqnr"
    rc = main(["--checkpoint", str(ckpt), "--data", str(data), "--metric", "sqnr", "--batch-size", "4",
               "--sqnr-batches", "1", "--auto-skip", "300", "--out", str(out)])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith(f"sensitivity: {n_layers} layers (leave-one-out, sqnr)")
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["metric"] == "sqnr" and report["images"] == 4 and len(report["results"]) == n_layers
    deltas = [r["delta"] for r in report["results"]]
    assert deltas == sorted(deltas, reverse=True)
    assert report["baseline"]["fp32"] == SQNR_CAP_DB and report["baseline"]["quantized"] < SQNR_CAP_DB
    md = (out / "sensitivity.md").read_text()
    assert "![sensitivity](sensitivity.png)" in md and f"`{report['results'][0]['layer']}`" in md
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    # an unreachable SQNR: every layer ends up in the skip list, as exact-match patterns
    skip = yaml.safe_load((out / "skip.yaml").read_text())["quant"]["skip"]
    assert len(skip) == n_layers and report["auto_skip"]["reached"] is False
    assert {p[1:-1].replace("\\", "") for p in skip} == {r["layer"] for r in report["results"]}
    trt_qat.QuantConfig(skip=skip)   # valid for the QAT stage


def test_cli_map_both_modes_on_a_subset(calibrated, capsys):
    root, data, ckpt, _ = calibrated
    out = root / "out_map"
    assert main(["--checkpoint", str(ckpt), "--data", str(data), "--mode", "both", "--layers", r"^detect\.",
                 "--max-images", "4", "--batch-size", "4", "--out", str(out)]) == 0
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["metric"] == "map" and report["modes"] == ["leave-one-out", "only-one"]
    assert sorted({r["layer"] for r in report["results"]}) == ["detect.m.0", "detect.m.1", "detect.m.2"]
    assert len(report["results"]) == 6 and all(0.0 <= r["score"] <= 1.0 for r in report["results"])
    assert "only-one Δ (mAP50-95)" in (out / "sensitivity.md").read_text()
    assert not (out / "skip.yaml").exists()


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "data.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.pt" in err and "does not exist" in err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
