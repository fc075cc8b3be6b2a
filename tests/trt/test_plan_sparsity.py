"""--sparsity in the pure build plan (BuilderFlag.SPARSE_WEIGHTS) on every supported TensorRT version, and the CPU
side of build_engine: the warning for `enable` without 2:4 weights, and `force` rewriting the weights."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from fixtures_onnx import make_qdq_convnet
from onnx import numpy_helper

from trt_qat.errors import TrtQatError
from trt_qat.trt.build import build_engine, count_2_4_convs, force_2_4_onnx
from trt_qat.trt.plan import SPARSITY_MODES, plan_build

VERSIONS = ["8.6.1", "8.6.2.3", "10.0.1", "10.3.0.26", "10.11.0", "10.12.0.36", "11.0.0", "11.4.1"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision, qdq", [("int8", True), ("fp16", False), ("fp32", False)])
def test_sparse_weights_flag_on_every_version(version, precision, qdq):
    dense = plan_build(version, precision, qdq)
    assert "SPARSE_WEIGHTS" not in dense.builder_flags and dense.sparsity == "disable"
    assert not dense.force_2_4_weights
    for mode in ("enable", "force"):
        plan = plan_build(version, precision, qdq, sparsity=mode)
        assert plan.builder_flags.count("SPARSE_WEIGHTS") == 1 and plan.sparsity == mode
        assert plan.force_2_4_weights == (mode == "force")
        # the other choices do not move
        assert [f for f in plan.builder_flags if f != "SPARSE_WEIGHTS"] == dense.builder_flags
        assert plan.strongly_typed == dense.strongly_typed and plan.network_flags == dense.network_flags
        assert plan.to_dict()["sparsity"] == mode
    if precision == "fp32":
        assert any("FP32 build gains little" in n for n in plan_build(version, "fp32", False, sparsity="enable").notes)
    assert any("accuracy is lost" in n for n in plan_build(version, precision, qdq, sparsity="force").notes)


def test_strongly_typed_trt11_keeps_only_the_sparsity_flag():
    plan = plan_build("11.0.0", "int8", True, sparsity="enable")
    assert plan.builder_flags == ["SPARSE_WEIGHTS"] and plan.strongly_typed


def test_unknown_sparsity_mode():
    assert SPARSITY_MODES == ("disable", "enable", "force")
    with pytest.raises(TrtQatError, match="unknown --sparsity 'on'"):
        plan_build("10.3.0", "int8", True, sparsity="on")
    assert plan_build("10.3.0", "int8", True, sparsity="ENABLE").sparsity == "enable"


def _conv_model(sparse: bool, tmp_path=None):
    """The shared Q/DQ convnet (conv1: 3 input channels, never 2:4; conv2: float 8 -> 2), conv2 made 2:4 or not."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        model = onnx.load(str(make_qdq_convnet(Path(d) / "m.onnx", channels=8)))
    for init in model.graph.initializer:
        if init.name == "w2":
            w = numpy_helper.to_array(init).copy()
            if sparse:
                w[:, 0::4] = 0
                w[:, 1::4] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model


def test_count_and_force_2_4(tmp_path):
    dense, sparse = _conv_model(False), _conv_model(True)
    assert count_2_4_convs(dense) == (0, 2) and count_2_4_convs(sparse) == (1, 2)
    src = tmp_path / "dense.onnx"
    onnx.save(dense, str(src))
    forced = force_2_4_onnx(src, tmp_path / "forced.onnx")
    assert count_2_4_convs(onnx.load(str(forced))) == (1, 2)  # conv1 has 3 input channels
    w = [numpy_helper.to_array(i) for i in onnx.load(str(forced)).graph.initializer if i.name == "w2"][0]
    assert np.count_nonzero(w) == w.size // 2


def test_enable_without_2_4_weights_warns_before_tensorrt(tmp_path, caplog):
    path = tmp_path / "dense.onnx"
    onnx.save(_conv_model(False), str(path))
    with caplog.at_level(logging.WARNING, logger="trt_qat"), pytest.raises(TrtQatError):
        build_engine(path, tmp_path / "e.engine", precision="int8", sparsity="enable")  # no TensorRT here
    assert "none of the 2 convs" in caplog.text and "trt-qat sparsify" in caplog.text
    caplog.clear()
    onnx.save(_conv_model(True), str(path))
    with caplog.at_level(logging.WARNING, logger="trt_qat"), pytest.raises(TrtQatError):
        build_engine(path, tmp_path / "e.engine", precision="int8", sparsity="enable")
    assert "none of the" not in caplog.text
    with pytest.raises(TrtQatError, match="unknown --sparsity"):
        build_engine(path, tmp_path / "e.engine", precision="int8", sparsity="sometimes")


def test_build_cli_sparsity_flag(tmp_path, capsys):
    from trt_qat.cli import build as build_cli

    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(False), str(path))
    with pytest.raises(SystemExit) as exc:
        build_cli.main(["--onnx", str(path), "--sparsity", "sometimes"])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--sparsity" in err[0] and "invalid choice" in err[0]
    assert build_cli.build_parser().parse_args(["--onnx", "x", "--sparsity", "force"]).sparsity == "force"
