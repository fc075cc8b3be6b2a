"""`trt-qat prune`, `finetune-pruned` and `sparsify`: the chain prune -> fine-tune -> calibrate -> QAT -> export ->
lint with no extra flag anywhere, and each bad input as one line with nothing written."""
from __future__ import annotations

import pytest
import torch
from fixtures_cli import one_line_error
from fixtures_data import tiny_digits_yaml  # noqa: F401  (pytest fixture)

from trt_qat.__main__ import main
from trt_qat.fileio import read_checkpoint
from trt_qat.models.adapter import get_adapter, load_fp32
from trt_qat.onnx.lint import lint_onnx

pytest.importorskip("torch_pruning")
ADAPTER = get_adapter("builtin")


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory):
    torch.manual_seed(0)
    return ADAPTER.save(ADAPTER.build("yolo-n", nc=10), tmp_path_factory.mktemp("w") / "fp32.pt")


def test_prune_finetune_calibrate_qat_export_lint(tiny_digits_yaml, fp32_path, tmp_path, capsys):  # noqa: F811
    pruned = tmp_path / "pruned.pt"
    assert main(["prune", "--checkpoint", str(fp32_path), "--imgsz", "64", "--target-macs", "0.6",
                 "--out", str(pruned)]) == 0
    assert "of the MACs" in capsys.readouterr().out
    ckpt = read_checkpoint(pruned)
    assert ckpt["pruned_shapes"] and ckpt["prune"]["macs_ratio"] <= 0.6 and ckpt["pruned_from"]
    model, _ = load_fp32(pruned)  # no extra flag: the checkpoint carries its architecture
    assert model.stem.conv.out_channels < 16
    tuned = tmp_path / "tuned.pt"
    assert main(["finetune-pruned", "--checkpoint", str(pruned), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                 "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--out", str(tuned)]) == 0
    assert "with distillation" in capsys.readouterr().out  # from the unpruned checkpoint it was pruned from
    calib = tmp_path / "calib"
    assert main(["calibrate", "--checkpoint", str(tuned), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                 "--out", str(calib)]) == 0
    assert main(["qat", "--checkpoint", str(calib / "quantized.pt"), "--data", str(tiny_digits_yaml), "--imgsz",
                 "64", "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--out", str(tmp_path / "qat")]) == 0
    onnx_path = tmp_path / "pruned_qdq.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "qat" / "best.pt"), "-o", str(onnx_path),
                 "--imgsz", "64"]) == 0
    stats = lint_onnx(str(onnx_path)).stats
    assert stats["scale_mismatches"] == 0 and stats["requantize_chains"] == 0 and stats["reformat_sites"] == 0


def test_finetune_pruned_never_writes_over_the_unpruned_checkpoint(fp32_path, tmp_path, capsys):
    """The unpruned checkpoint a pruned one names (``pruned_from``) is an input (the teacher): --out on it is
    refused before anything runs."""
    pruned = tmp_path / "p.pt"
    assert main(["prune", "--checkpoint", str(fp32_path), "--imgsz", "64", "--target-macs", "0.6",
                 "--out", str(pruned)]) == 0
    capsys.readouterr()
    before = fp32_path.read_bytes()
    line = one_line_error(capsys, ["finetune-pruned", "--checkpoint", str(pruned), "--data", "d.yaml", "--imgsz",
                                   "64", "--out", str(fp32_path)])
    assert "--out" in line and fp32_path.read_bytes() == before


def test_bn_sparsity_train_then_prune(tiny_digits_yaml, fp32_path, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "slim.pt"
    assert main(["prune", "--checkpoint", str(fp32_path), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                 "--bn-sparsity-train", "--bn-epochs", "1", "--max-steps", "2", "--batch-size", "4",
                 "--target-params", "0.8", "--keep", r"^stem\.", "--round-to", "16", "--out", str(out)]) == 0
    info = read_checkpoint(out)["prune"]
    assert info["importance"] == "bn_scale" and info["bn_sparsity"]["count"] > 0 and "stem.conv" in info["kept"]
    model, _ = load_fp32(out)
    assert model.stem.conv.out_channels == 16 and model.down1.conv.out_channels % 16 == 0


def test_sparsify_and_finetune_with_masks(tiny_digits_yaml, fp32_path, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sparse.pt"
    assert main(["sparsify", "--checkpoint", str(fp32_path), "--min-channels", "128", "--data",
                 str(tiny_digits_yaml), "--imgsz", "64", "--epochs", "1", "--max-steps", "1", "--batch-size", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2:4 sparsity rule" in printed and "at least 128 input" in printed
    from trt_qat.prune.sparsity import holds_2_4

    model, _ = load_fp32(out)
    layers = read_checkpoint(out)["sparsity_2_4"]["layers"]
    modules = dict(model.named_modules())
    assert layers and all(holds_2_4(modules[n].weight) for n in layers)  # fine-tuning kept the masks
    # and `trt-qat calibrate` -> `trt-qat qat` keeps them too (the qat command re-applies the weights' own pattern)
    calib, qat = tmp_path / "calib", tmp_path / "qat"
    assert main(["calibrate", "--checkpoint", str(out), "--data", str(tiny_digits_yaml), "--imgsz", "64",
                 "--out", str(calib)]) == 0
    assert main(["qat", "--checkpoint", str(calib / "quantized.pt"), "--data", str(tiny_digits_yaml), "--imgsz",
                 "64", "--epochs", "1", "--max-steps", "2", "--batch-size", "4", "--lr", "0.01",
                 "--out", str(qat)]) == 0
    weights = read_checkpoint(qat / "best.pt")["state_dict"]  # (what export reads)
    changed = [n for n in layers if not torch.equal(weights[f"{n}.weight"].float(), modules[n].weight.float())]
    assert changed and all(holds_2_4(weights[f"{n}.weight"]) for n in layers)  # trained, and still 2:4


@pytest.mark.parametrize("argv, msg", [
    (["prune", "--target-macs", "1.5"], r"outside \(0, 1\]"),
    (["prune", "--target-macs", "0"], r"outside \(0, 1\]"),
    (["prune", "--target-params", "-1"], r"outside \(0, 1\]"),
    (["prune"], "no pruning target"),
    (["prune", "--target-macs", "0.5", "--keep", "no_such_layer"], "matches no conv"),
    (["prune", "--target-macs", "0.5", "--bn-sparsity-train"], "--bn-sparsity-train trains on --data"),
    (["sparsify"], "no conv is eligible for 2:4"),
])
def test_bad_inputs_are_one_line(fp32_path, tmp_path, capsys, argv, msg):
    out = tmp_path / "out" / "x.pt"
    line = one_line_error(capsys, [*argv, "--checkpoint", str(fp32_path), "--imgsz", "32", "--out", str(out),
                                   *(["--min-channels", "1024"] if argv[0] == "sparsify" else [])],
                          tmp_path, fp32_path.parent)
    assert __import__("re").search(msg, line), line
    assert not out.exists()


def test_pruned_checkpoint_into_the_unpruned_architecture(fp32_path, tmp_path, capsys):
    pruned = tmp_path / "p.pt"
    assert main(["prune", "--checkpoint", str(fp32_path), "--imgsz", "32", "--target-macs", "0.7",
                 "--out", str(pruned)]) == 0
    capsys.readouterr()
    ckpt = torch.load(pruned, weights_only=True)
    del ckpt["pruned_shapes"]  # its state_dict alone, as another tool would save it
    stripped = tmp_path / "stripped.pt"
    torch.save(ckpt, stripped)
    line = one_line_error(capsys, ["eval", "--checkpoint", str(stripped), "--data", "none.yaml"], tmp_path)
    assert "holds a pruned model" in line and "unpruned architecture" in line
