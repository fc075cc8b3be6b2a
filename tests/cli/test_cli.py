"""`import trt_qat` and every `--help` work with tensorrt and pycuda absent; the dispatcher routes every stage."""
import subprocess
import sys
import textwrap

import pytest

from trt_qat.__main__ import COMMANDS
from trt_qat.__main__ import main as dispatch

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorrt", "pycuda"):
                raise ImportError(f"{name} blocked for this test")
    sys.meta_path.insert(0, Block())
""")


def test_import_and_all_modules_without_tensorrt_pycuda_or_onnxruntime_loaded():
    modules = sorted({m for m, _ in COMMANDS.values()})
    code = BLOCK + textwrap.dedent(f"""
        import importlib, sys
        import trt_qat
        for m in {modules!r} + ["trt_qat.runners.trt", "trt_qat.runners.onnxrt", "trt_qat.onnx.fp16"]:
            importlib.import_module(m)
        loaded = [m for m in ("tensorrt", "pycuda", "onnxruntime") if m in sys.modules]
        print("LOADED", loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_stage_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        dispatch([command, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_top_level_help_and_unknown_command(capsys):
    assert dispatch(["--help"]) == 0
    assert "commands:" in capsys.readouterr().out
    assert dispatch(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'frobnicate'" in err[0]


def test_missing_tensorrt_is_one_clear_line(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    code = BLOCK + textwrap.dedent(f"""
        import torch, trt_qat
        from torch import nn
        m = trt_qat.quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), trt_qat.QuantConfig(rules=False))
        trt_qat.calibrate(m, [torch.randn(1, 3, 8, 8)], method="max", progress=False)
        trt_qat.export_onnx(m, torch.randn(1, 3, 8, 8), {str(onnx_path)!r})
        from trt_qat.__main__ import main
        sys.exit(main(["build", "--onnx", {str(onnx_path)!r}, "--saveEngine", {str(tmp_path / "e.engine")!r}]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("trt_qat: error:")]
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "Docker" in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "e.engine").exists()


@pytest.mark.parametrize("module", ["trt_qat.cli.build", "trt_qat.cli.bench", "trt_qat.cli.compare"])
def test_every_trt_tool_flag_is_documented_in_readme(module):
    import argparse
    import importlib
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    parser = importlib.import_module(module).build_parser()
    flags = [o for a in parser._actions if not isinstance(a, argparse._HelpAction) for o in a.option_strings
             if o.startswith("--")]
    missing = [f for f in flags if f"`{f}`" not in readme]
    assert flags and not missing


@pytest.mark.parametrize("command", ["calibrate", "qat", "sensitivity"])
@pytest.mark.parametrize("device", ["gpu0", "cuda:7"])
def test_unusable_device_is_one_clear_line(command, device, tmp_path, capsys):
    import torch

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    ckpt = tmp_path / "missing.pt"  # the device is checked before anything is loaded or run
    with pytest.raises(SystemExit) as exc:
        dispatch([command, "--checkpoint", str(ckpt), "--data", str(tmp_path / "d.yaml"), "--device", device,
                  "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and not (tmp_path / "out").exists()  # nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"device '{device}'" in err[0], err


@pytest.mark.parametrize("argv, msg", [
    (["calibrate", "--checkpoint", "c.pt", "--data", "d.yaml", "--imgsz", "100"], "multiple of 32"),
    (["qat", "--checkpoint", "c.pt", "--data", "d.yaml", "--max-steps", "-1"], "--max-steps: -1 must be >= 1"),
    (["sensitivity", "--checkpoint", "c.pt", "--data", "d.yaml", "--layers", "("], "not a valid regex"),
    (["train", "--data", "d.yaml", "--lr", "-1"], "--lr: -1.0 must be a positive number"),
    (["export", "--checkpoint", "c.pt"], "required: --output"),
])
def test_flag_errors_are_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        dispatch(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trt_qat: error:") and msg in err[0], err


def test_uncalibrated_checkpoint_is_refused_by_eval_and_compare(tmp_path):
    import torch

    import trt_qat
    from trt_qat.errors import TrtQatError
    from trt_qat.models.yolo import build_model
    from trt_qat.runners.torch_runner import torch_runner_from_checkpoint

    model = trt_qat.quantize(build_model("yolo-n"), trt_qat.QuantConfig(), sample_input=torch.zeros(1, 3, 64, 64))
    trt_qat.save_quantized(model, tmp_path / "uncal.pt")
    with pytest.raises(TrtQatError, match="never calibrated"):
        torch_runner_from_checkpoint(tmp_path / "uncal.pt")


@pytest.mark.parametrize("argv, msg", [
    (["eval", "--checkpoint", "c.pt", "--data", "d.yaml", "--conf-thres", "2"], "--conf-thres: 2.0 must be in [0, 1]"),
    (["compare", "--onnx", "m.onnx", "--cosine", "nan"], "not a finite number"),
    (["sensitivity", "--checkpoint", "c.pt", "--data", "d.yaml", "--auto-skip", "-1"], "must be >= 0"),
])
def test_range_flags_are_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        dispatch(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_long_runs_check_their_output_path_first(tmp_path, capsys):
    with pytest.raises(SystemExit):  # --json is a directory: refused before any image is evaluated
        dispatch(["eval", "--checkpoint", str(tmp_path / "c.pt"), "--data", str(tmp_path / "d.yaml"),
                  "--json", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory" in err[0], err


def test_quantized_checkpoint_where_fp32_is_needed(tmp_path):
    import torch

    import trt_qat
    from trt_qat.errors import TrtQatError
    from trt_qat.models.yolo import build_model, load_checkpoint

    model = trt_qat.quantize(build_model("yolo-n"), trt_qat.QuantConfig(), sample_input=torch.zeros(1, 3, 64, 64))
    trt_qat.save_quantized(model, tmp_path / "q.pt")
    with pytest.raises(TrtQatError, match="quantized .* needs the FP32 one"):
        load_checkpoint(tmp_path / "q.pt")
