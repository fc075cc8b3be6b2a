"""Output comparison between runners, for real with ONNX Runtime on CPU."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from fixtures_onnx import make_qdq_convnet
from onnx import numpy_helper

from trt_qat.cli import compare as compare_cli
from trt_qat.errors import TrtQatError
from trt_qat.measure import compare as cmp
from trt_qat.runners.onnxrt import OnnxrtRunner


@pytest.fixture
def nets(tmp_path):
    qdq = make_qdq_convnet(tmp_path / "qdq.onnx")
    fp32 = make_qdq_convnet(tmp_path / "fp32.onnx", qdq=False)
    model = onnx.load(str(fp32))  # a "broken" variant: last conv's weights negated
    for init in model.graph.initializer:
        if init.name == "w2":
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), "w2"))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    return qdq, fp32, broken


def test_compare_outputs():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 5)).astype(np.float32)
    (row,) = cmp.compare_outputs({"y": a}, {"y": a.copy()})
    assert row["ok"] and row["max_abs"] == 0 and row["mean_abs"] == 0 and row["cosine"] == pytest.approx(1.0)
    (row,) = cmp.compare_outputs({"y": a}, {"y": a + 0.5})
    assert row["max_abs"] == pytest.approx(0.5) and row["mean_abs"] == pytest.approx(0.5)
    assert row["cosine"] < 0.999 and not row["ok"] and "cosine" in row["reason"]
    (row,) = cmp.compare_outputs({"y": a}, {"y": a + 1e-4}, {"cosine": 0.99, "max_abs": 1e-5})
    assert not row["ok"] and "max_abs" in row["reason"]
    (row,) = cmp.compare_outputs({"y": a}, {"y": -a})
    assert row["cosine"] == pytest.approx(-1.0) and not row["ok"]
    rows = cmp.compare_outputs({"y": a, "z": a}, {"y": a[:1]})
    assert "shape" in rows[0]["reason"] and "missing" in rows[1]["reason"]
    (row,) = cmp.compare_outputs({"y": a}, {"y": np.full_like(a, np.nan)})
    assert not row["ok"] and "non-finite" in row["reason"]
    (row,) = cmp.compare_outputs({"y": np.zeros(3)}, {"y": np.zeros(3)})
    assert row["ok"] and row["cosine"] == 1.0
    with pytest.raises(TrtQatError, match="unknown comparison thresholds"):
        cmp.compare_outputs({"y": a}, {"y": a}, {"cos": 0.9})


def test_compare_runners_agree_and_disagree(nets):
    qdq, fp32, broken = nets
    rng = np.random.default_rng(1)
    feeds = [{"images": rng.standard_normal((b, 3, 8, 8)).astype(np.float32)} for b in (1, 2, 3)]
    runners = [OnnxrtRunner(fp32, name="fp32"), OnnxrtRunner(qdq, name="int8"), OnnxrtRunner(broken, name="broken")]
    report = cmp.compare_runners(runners, feeds, {"cosine": 0.99})
    assert report["n_feeds"] == 3 and report["reference"] == "fp32"
    assert not any(r.is_active for r in runners)
    by_name = {p["test"]: p for p in report["pairs"]}
    int8 = by_name["int8"]["outputs"][0]
    assert by_name["int8"]["ok"] and int8["cosine"] > 0.99 and int8["max_abs"] > 0  # Q/DQ adds real error
    assert not by_name["broken"]["ok"] and by_name["broken"]["outputs"][0]["cosine"] < 0
    assert not report["ok"]
    text = cmp.format_report(report)
    assert "DISAGREES" in text and "broken" in text and "DISAGREEMENT beyond thresholds" in text
    json.dumps(report)  # serializable for the report stage

    with pytest.raises(TrtQatError, match="at least two runners"):
        cmp.compare_runners([runners[0]], feeds)
    with pytest.raises(TrtQatError, match="unique"):
        cmp.compare_runners([OnnxrtRunner(fp32), OnnxrtRunner(qdq)], feeds)
    with pytest.raises(TrtQatError, match="no inputs"):
        cmp.compare_runners(runners[:2], [])


def test_main_exit_codes_and_json(nets, tmp_path, capsys):
    qdq, fp32, broken = nets
    out = tmp_path / "cmp.json"
    rc = compare_cli.main(["--onnx", str(fp32), "--onnx", str(qdq), "--batch", "2", "--num-inputs", "2",
                           "--cosine", "0.99", "--exportJson", str(out)])
    assert rc == 0
    assert "all runners agree" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["n_feeds"] == 2 and doc["runners"] == ["ort:0", "ort:1"]
    assert compare_cli.main(["--onnx", str(fp32), "--onnx", str(broken), "--input-shape", "images:1x3x8x8"]) == 1

    npz = tmp_path / "inputs.npz"
    np.savez(npz, images=np.ones((1, 3, 8, 8), np.float32))
    assert compare_cli.main(["--onnx", str(fp32), "--onnx", str(fp32), "--inputs", str(npz)]) == 0
    np.savez(npz, other=np.ones((1, 3, 8, 8), np.float32))
    with pytest.raises(SystemExit) as exc:
        compare_cli.main(["--onnx", str(fp32), "--onnx", str(fp32), "--inputs", str(npz)])
    assert exc.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        compare_cli.main(["--onnx", str(fp32)])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "at least two models" in err[0]
    with pytest.raises(SystemExit) as exc:  # a shape for an input the model does not have
        compare_cli.main(["--onnx", str(fp32), "--onnx", str(qdq), "--input-shape", "foo:1x3x8x8"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and "unknown inputs ['foo']" in err[0], err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        compare_cli.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--onnx", "--engine", "--providers", "--input-shape", "--batch", "--inputs", "--num-inputs", "--seed",
                 "--cosine", "--max-abs", "--mean-abs", "--threads", "--exportJson"):
        assert flag in out


def test_empty_npz_inputs_are_one_clear_error(tmp_path):
    from trt_qat.errors import TrtQatError
    from trt_qat.measure.compare import load_npz_feed

    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    with pytest.raises(TrtQatError, match="cannot read inputs"):
        load_npz_feed(path, ["images"])
