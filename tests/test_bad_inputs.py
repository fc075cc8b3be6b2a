"""Bad and hostile inputs across the stages: each is one line (`trt_qat: error: ...`), exit 2, no traceback, nothing
written and no input overwritten. Also: checkpoints are data only, identical runs write identical bytes, a second
run on one output is refused, a killed run's leftovers are cleaned, SIGTERM is handled like Ctrl-C.

Data decoding, measurement and report cases are in tests/data/, tests/measure/ and tests/report/."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fixtures_cli import one_line_error
from fixtures_data import tiny_digits_yaml  # noqa: F401  (pytest fixture)

from trt_qat.__main__ import main
from trt_qat.errors import TrtQatError
from trt_qat.fileio import output_lock, read_checkpoint, write_unit

ROOT = Path(__file__).resolve().parents[1]


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files(directory) -> list:
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


@pytest.fixture(scope="module")
def fp32_ckpt(tmp_path_factory):
    from trt_qat.models.adapter import get_adapter

    adapter = get_adapter("builtin")
    torch.manual_seed(0)
    return adapter.save(adapter.build("yolo-n", nc=10), tmp_path_factory.mktemp("fp32") / "fp32.pt")


@pytest.fixture(scope="module")
def calibrated(tiny_digits_yaml, fp32_ckpt, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("calib") / "run"
    assert main(["calibrate", "--checkpoint", str(fp32_ckpt), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                 "--out", str(out)]) == 0
    return out


# --- checkpoints are data, never code ---------------------------------------------------------------------------
class _Payload:
    """A pickle that creates a file when unpickled: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "trt_qat.quantized/1", "state_dict": {}, "x": _Payload(str(marker))}, evil)
    with pytest.raises(TrtQatError, match="holds code"):
        read_checkpoint(evil)
    line = one_line_error(capsys, ["export", "--checkpoint", str(evil), "-o", str(tmp_path / "m.onnx")])
    assert "never runs" in line
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


# --- no input is ever overwritten ---------------------------------------------------------------------------
def test_export_onto_its_own_checkpoint_is_refused(calibrated, capsys):
    ckpt = calibrated / "quantized.pt"
    before = digest(ckpt)
    line = one_line_error(capsys, ["export", "--checkpoint", str(ckpt), "-o", str(ckpt)])
    assert "would destroy the input" in line and digest(ckpt) == before


def test_lint_json_onto_its_own_onnx_is_refused(tmp_path, capsys):
    from fixtures_onnx import make_qdq_convnet

    onnx_path = make_qdq_convnet(tmp_path / "m.onnx")
    before = digest(onnx_path)
    assert "would destroy the input" in one_line_error(capsys, ["lint", str(onnx_path), "--json", str(onnx_path)])
    assert digest(onnx_path) == before


def test_qat_out_holding_its_input_checkpoint_is_refused(calibrated, tiny_digits_yaml, capsys):  # noqa: F811
    ckpt = calibrated / "quantized.pt"
    best = calibrated / "best.pt"
    best.write_bytes(ckpt.read_bytes())
    before = digest(best)
    line = one_line_error(capsys, ["qat", "--checkpoint", str(best), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                                   "--out", str(calibrated)])
    assert "--out" in line and digest(best) == before
    best.unlink()


def test_calibrate_out_holding_its_input_is_refused(fp32_ckpt, tiny_digits_yaml, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "o"
    out.mkdir()
    (out / "quantized.pt").write_bytes(Path(fp32_ckpt).read_bytes())
    line = one_line_error(capsys, ["calibrate", "--checkpoint", str(out / "quantized.pt"), "--data",
                                   str(tiny_digits_yaml), "--out", str(out)])
    assert "would destroy the input" in line


# --- malformed checkpoints, data that does not fit the model -----------------------------------------------------
def test_quantized_checkpoint_whose_config_lacks_a_key(calibrated, tmp_path, tiny_digits_yaml, capsys):  # noqa: F811
    ckpt = read_checkpoint(calibrated / "quantized.pt")
    del ckpt["model_cfg"]["nc"]
    broken = tmp_path / "broken.pt"
    torch.save(ckpt, broken)
    for argv in (["export", "--checkpoint", str(broken), "-o", str(tmp_path / "m.onnx")],
                 ["qat", "--checkpoint", str(broken), "--data", str(tiny_digits_yaml), "--out", str(tmp_path / "q")],
                 ["eval", "--checkpoint", str(broken), "--data", str(tiny_digits_yaml)]):
        assert "lacks 'nc'" in one_line_error(capsys, argv)
    assert files(tmp_path) == ["broken.pt"]


def test_data_whose_nc_disagrees_with_the_model(tiny_digits_yaml, tmp_path, capsys):  # noqa: F811
    from trt_qat.models.adapter import get_adapter

    adapter = get_adapter("builtin")
    other = adapter.save(adapter.build("yolo-n", nc=3), tmp_path / "nc3.pt")
    line = one_line_error(capsys, ["calibrate", "--checkpoint", str(other), "--data", str(tiny_digits_yaml),
                                   "--out", str(tmp_path / "out")])
    assert "nc=10" in line and "predicts 3" in line
    assert not (tmp_path / "out").exists()  # refused before writing: no empty directory left


# --- numbers out of range ----------------------------------------------------------------------------------------
def _config(tmp_path, **sections):
    cfg = {"model": {"checkpoint": "weights/yolo-n_digits-det.pt"}, "data": {"data": "missing/data.yaml"},
           "run": {"out_dir": str(tmp_path / "reports")}}
    for key, value in sections.items():
        cfg.setdefault(key.split("__")[0], {})[key.split("__")[1]] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("key, value, msg", [
    ("data__imgsz", 0, "between 32 and 8192"), ("data__imgsz", -32, "between 32 and 8192"),
    ("data__imgsz", 100000, "between 32 and 8192"), ("run__threads", -1, "run.threads"),
    ("qat__lr", 1e30, "qat.lr"), ("qat__lr", float("nan"), "qat.lr"), ("data__workers", -2, "data.workers"),
    ("export__imgsz", 48, "export.imgsz"), ("run__seed", -1, "run.seed")])
def test_config_numbers_out_of_range(tmp_path, capsys, key, value, msg):
    cfg = _config(tmp_path, **{key: value})
    assert msg in one_line_error(capsys, ["run", "--config", str(cfg)])
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("argv, msg", [
    (["qat", "--checkpoint", "c.pt", "--data", "d.yaml", "--lr", "1e30"], "too large for a learning rate"),
    (["train", "--data", "d.yaml", "--lr", "2"], "too large for a learning rate"),
    (["train", "--data", "d.yaml", "--imgsz", "16384"], "between 32 and 8192"),
    (["train", "--data", "d.yaml", "--threads", "-1"], "--threads")])
def test_flag_numbers_out_of_range(capsys, argv, msg):
    assert msg in one_line_error(capsys, argv)


def test_set_value_that_is_not_yaml(tmp_path, capsys):
    line = one_line_error(capsys, ["run", "--config", str(_config(tmp_path)), "--set", "qat.epochs=[1"])
    assert "not valid YAML" in line


@pytest.mark.parametrize("device", ["mps", "meta", "foo", "cpu:x"])
def test_devices_other_than_cpu_and_cuda(fp32_ckpt, tiny_digits_yaml, tmp_path, capsys, device):  # noqa: F811
    line = one_line_error(capsys, ["calibrate", "--checkpoint", str(fp32_ckpt), "--data", str(tiny_digits_yaml),
                                   "--out", str(tmp_path / "o"), "--device", device])
    assert device in line and "cpu" in line
    assert not (tmp_path / "o").exists()


# --- one run per output; a killed run's leftovers ----------------------------------------------------------------
def test_a_second_run_on_the_same_out_is_refused(fp32_ckpt, tiny_digits_yaml, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); "
                               "from trt_qat.fileio import output_lock; import time\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               str(out), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(capsys, ["calibrate", "--checkpoint", str(fp32_ckpt), "--data", str(tiny_digits_yaml),
                                       "--imgsz", "64", "--out", str(out)])
        assert f"PID {holder.pid}" in line and not (out / "quantized.pt").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_leftovers_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    (out / "qat").mkdir(parents=True)
    (out / ".trt_qat.lock").write_text(f"{dead.pid}\n")
    (out / ".quantized.pt.abc12_yz.tmp").write_bytes(b"x" * 1000)  # atomic_path's names: 8 random characters
    (out / "qat" / ".last.pt.def45678.tmp").write_bytes(b"x")
    (out / "notes.tmp").write_bytes(b"a user's file: not ours to remove")
    (out / "keep.pt").write_bytes(b"mine")
    with output_lock(out):
        assert (out / ".trt_qat.lock").read_text().strip() == str(os.getpid())
    assert files(out) == ["keep.pt", "notes.tmp", "qat"]


def test_files_of_one_stage_are_one_unit(tmp_path):
    (tmp_path / "quantized.pt").write_bytes(b"old")
    (tmp_path / "amax.pt").write_bytes(b"old amax")

    def dies(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_unit(tmp_path, {"quantized.pt": lambda p: p.write_bytes(b"new"), "amax.pt": dies})
    # the new quantized.pt never sits beside the old amax.pt, and there is no manifest for a half-written unit
    assert files(tmp_path) == ["quantized.pt"] and (tmp_path / "quantized.pt").read_bytes() == b"new"
    write_unit(tmp_path, {"quantized.pt": lambda p: p.write_bytes(b"new"), "amax.pt": lambda p: p.write_bytes(b"a")})
    assert files(tmp_path) == ["MANIFEST.json", "amax.pt", "quantized.pt"]


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tiny_digits_yaml, tmp_path):  # noqa: F811
    out = tmp_path / "best.pt"
    proc = subprocess.Popen([sys.executable, "-m", "trt_qat", "train", "--data", str(tiny_digits_yaml), "--epochs",
                             "200", "--batch", "2", "--imgsz", "64", "--threads", "1", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while not out.with_name("best.last.pt").exists() and time.time() < deadline:  # a checkpoint was written
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err and "Traceback" not in err
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.lock"))


# --- identical runs, identical bytes -----------------------------------------------------------------------------
def test_identical_runs_write_identical_bytes(fp32_ckpt, tiny_digits_yaml, tmp_path):  # noqa: F811
    def run(name):
        out = tmp_path / name
        assert main(["calibrate", "--checkpoint", str(fp32_ckpt), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                     "--out", str(out / "calib")]) == 0
        assert main(["qat", "--checkpoint", str(out / "calib" / "quantized.pt"), "--data", str(tiny_digits_yaml),
                     "--imgsz", "64", "--epochs", "2", "--batch-size", "4", "--out", str(out / "qat")]) == 0
        assert main(["export", "--checkpoint", str(out / "qat" / "best.pt"), "--imgsz", "64",
                     "-o", str(out / "m.onnx")]) == 0
        return {p: digest(out / p) for p in ("calib/quantized.pt", "calib/amax.pt", "calib/MANIFEST.json",
                                             "qat/best.pt", "qat/last.pt", "m.onnx")}

    assert run("a") == run("b")


def test_train_refuses_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "without torchrun" in one_line_error(capsys, ["train", "--data", "d.yaml"])
