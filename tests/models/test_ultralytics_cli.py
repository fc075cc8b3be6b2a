"""An Ultralytics .pt through the command line: recognised from the checkpoint (read without unpickling), then
calibrate -> export -> eval in ONNX Runtime and in PyTorch -> lint, with the DFL conv kept in float on purpose."""
from __future__ import annotations

import json

import pytest
import torch
from fixtures_data import tiny_digits_yaml  # noqa: F401  (pytest fixture)

pytest.importorskip("ultralytics", reason="ultralytics is not installed (pip install trt-qat[ultralytics])")

from trt_qat.__main__ import main  # noqa: E402
from trt_qat.models.adapter import family_of_pickle, load_fp32  # noqa: E402


@pytest.fixture(scope="module")
def yolov8n_pt(tmp_path_factory):
    """A YOLOv8n .pt as Ultralytics writes it (a pickled DetectionModel, FP16), 10 classes, built offline."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ul") / "yolov8n.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=10, verbose=False).half(), "train_args": {}}, path)
    return path


def test_family_is_recognised_without_unpickling_and_loaded_only_when_asked(yolov8n_pt, tmp_path):
    from trt_qat.errors import TrtQatError

    assert family_of_pickle(yolov8n_pt) == "ultralytics"
    with pytest.raises(TrtQatError, match="runs the code it holds.*--model-family ultralytics"):
        load_fp32(yolov8n_pt)  # unpickling runs code: only on request
    model, adapter = load_fp32(yolov8n_pt, "ultralytics")
    assert adapter.family == "ultralytics" and adapter.num_classes(model) == 10
    assert next(model.parameters()).dtype == torch.float32


def test_a_pickle_naming_os_system_is_refused_before_it_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    from ultralytics.nn.modules import Conv

    evil = tmp_path / "evil.pt"
    torch.save({"model": Conv(3, 4), "x": Payload()}, evil)  # names ultralytics, so it looks like theirs
    with pytest.raises(SystemExit) as exc:  # even when the user asks for the family, the unpickler refuses it
        main(["calibrate", "--checkpoint", str(evil), "--model-family", "ultralytics", "--data", "d.yaml",
              "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed" in err and "system" in err and "Traceback" not in err
    assert not marker.exists()
    # an INST opcode naming os.system (which a scan of GLOBAL opcodes would miss) is refused the same way
    import zipfile

    inst = tmp_path / "inst.pt"
    with zipfile.ZipFile(inst, "w") as zf:
        zf.writestr("archive/data.pkl", b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")
        zf.writestr("archive/version", "3\n")
    with pytest.raises(SystemExit):
        main(["calibrate", "--checkpoint", str(inst), "--model-family", "ultralytics", "--data", "d.yaml",
              "--out", str(tmp_path / "o")])
    assert not marker.exists()


def test_calibrate_export_eval_lint(yolov8n_pt, tiny_digits_yaml, tmp_path, capsys):  # noqa: F811
    calib, onnx_path = tmp_path / "calib", tmp_path / "m.onnx"
    assert main(["calibrate", "--checkpoint", str(yolov8n_pt), "--model-family", "ultralytics", "--data",
                 str(tiny_digits_yaml), "--imgsz", "64", "--out", str(calib)]) == 0
    assert main(["export", "--checkpoint", str(calib / "quantized.pt"), "--imgsz", "64", "-o", str(onnx_path)]) == 0
    for source in (["--onnx", str(onnx_path)], ["--checkpoint", str(calib / "quantized.pt")]):
        out = tmp_path / f"eval_{source[0][2:]}.json"
        assert main(["eval", *source, "--data", str(tiny_digits_yaml), "--imgsz", "64", "--json", str(out)]) == 0
        row = json.loads(out.read_text())
        assert row["images"] == 6 and 0.0 <= row["map50_95"] <= 1.0
    report = tmp_path / "lint.json"
    main(["lint", str(onnx_path), "--json", str(report)])
    stats = json.loads(report.read_text())["stats"]
    assert stats["weighted_layers"] - stats["int8_layers"] == 1  # the DFL conv, in float on purpose
    capsys.readouterr()


def test_c2f_residual_adds_are_quantized_at_the_chunked_conv():
    """C2f cuts its bottlenecks' skip input out of cv1's output with ``chunk``: the rules quantize cv1's output,
    so every backbone residual Add of YOLOv8n is quantized (only the head's two anchor Adds stay float)."""
    import trt_qat
    from trt_qat.models.adapter import get_adapter

    adapter = get_adapter("ultralytics")
    model = adapter.build("yolov8n.yaml", nc=10)
    trt_qat.quantize(model, trt_qat.QuantConfig(skip=adapter.float_skip_patterns(model)),
                     sample_input=adapter.sample_input(64))
    report = model.trt_qat_rules_report
    assert report.adds_quantized == 6
    assert not [why for _, why in report.adds_left_alone if "chunk" in why]
    # and building another model afterwards is not affected (the shared default activation was never touched)
    fresh = adapter.build("yolov8n.yaml", nc=10)
    assert not any("_trt_qat" in name for name, _ in fresh.named_modules())


def _readme_commands() -> list:
    """The command lines of README's "Your Ultralytics or YOLOv5 model" block, as argument lists."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- ultralytics-commands:start -->")[1].split("<!-- ultralytics-commands:end -->")[0]
    lines = [line for line in block.splitlines() if line.startswith("python -m trt_qat ")]
    return [shlex.split(line)[3:] for line in lines]  # (after `python -m trt_qat`)


def test_readme_commands_on_a_pt_written_by_yolo_save(tiny_digits_yaml, tmp_path, monkeypatch, capsys):  # noqa: F811
    """README's Ultralytics commands, as written, on a .pt that ``YOLO(...).save()`` wrote: calibrate -> qat ->
    export -> eval --onnx -> lint. The only changes: the tiny dataset, and QAT capped at 2 steps."""
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolov8n.yaml")
    cfg["nc"] = 10
    (tmp_path / "yolov8n-10.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "yaml_file"}))
    torch.manual_seed(0)
    model = YOLO(str(tmp_path / "yolov8n-10.yaml"))
    model.model.names = {i: str(i) for i in range(10)}
    model.ckpt = {"train_args": {"imgsz": 64}}  # what Ultralytics training leaves in a .pt: its image size
    model.save(str(tmp_path / "yolov8n.pt"))
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert [c[0] for c in commands] == ["calibrate", "qat", "export", "eval", "lint"]
    for argv in commands:
        argv = [str(tiny_digits_yaml) if a == "data.yaml" else a for a in argv]
        if argv[0] == "qat":
            argv += ["--max-steps", "2"]
        if argv[0] == "lint":
            argv += ["--json", "lint.json"]
        assert main(argv) in (0, None), argv
    assert (tmp_path / "calib/yolov8n/quantized.pt").is_file() and (tmp_path / "runs/yolov8n-qat/best.pt").is_file()
    out = capsys.readouterr().out
    assert "yolov8n_qdq (onnxruntime): mAP50" in out
    stats = json.loads((tmp_path / "lint.json").read_text())["stats"]
    # the DFL conv is the one float layer, declared in the ONNX by the export, so lint counts it as deliberate
    assert stats["int8_coverage_excluding_skipped"] == 1.0 and stats["skipped_float_layers"] == 1
    assert [f["why"][:12] for f in stats["float_layers"]] == ["DFL integral"]
    assert stats["scale_mismatches"] == 0 and stats["requantize_chains"] == 0 and stats["reformat_sites"] == 0


def test_train_refuses_a_yaml_that_is_not_a_model_yaml(tiny_digits_yaml, tmp_path, capsys):  # noqa: F811
    from fixtures_cli import one_line_error

    bad = tmp_path / "broken.yaml"
    bad.write_text("backbone: [\n")
    for model, msg in ((str(tiny_digits_yaml), "is not an Ultralytics model yaml"), (str(bad), "cannot be read")):
        line = one_line_error(capsys, ["train", "--data", str(tiny_digits_yaml), "--model", model, "--model-family",
                                       "ultralytics", "--out", str(tmp_path / "w.pt")])
        assert msg in line
    assert not (tmp_path / "w.pt").exists()


def test_compare_an_ultralytics_pt_with_its_own_onnx(yolov8n_pt, tmp_path, capsys):
    """The PyTorch runner of an Ultralytics checkpoint names its output as the export does (output0), so compare
    pairs the two up and agrees."""
    onnx_path = tmp_path / "y.onnx"
    assert main(["export", "--checkpoint", str(yolov8n_pt), "--model-family", "ultralytics", "--imgsz", "64",
                 "-o", str(onnx_path)]) == 0
    assert main(["compare", "--onnx", str(onnx_path), "--checkpoint", str(yolov8n_pt), "--model-family",
                 "ultralytics", "--num-inputs", "1"]) == 0
    assert "DISAGREES" not in capsys.readouterr().out
