"""ONNX Q/DQ structure of an exported quantized model."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import trt_qat
from trt_qat.cli.export import main as export_main
from trt_qat.config import QuantConfig


def _const_values(graph):
    vals = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            vals[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return vals


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(8, 4, 2, stride=2),
                          nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    trt_qat.quantize(model, QuantConfig(rules=False))
    trt_qat.calibrate(model, [torch.randn(2, 3, 8, 8) for _ in range(2)], method="entropy", progress=False)
    path = trt_qat.export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path_factory.mktemp("x") / "m.onnx", opset=13)
    return onnx.load(str(path)), model


def test_opset_and_dynamic_batch(exported):
    proto, _ = exported
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 13
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"


def test_qdq_pairs_zero_points_and_axes(exported):
    proto, _ = exported
    g = proto.graph
    vals = _const_values(g)
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(qs) == len(dqs) == 6  # 3 weighted layers x (input, weight)
    consumers = {i: n for n in g.node for i in n.input}
    for q in qs:
        assert consumers[q.output[0]].op_type == "DequantizeLinear"
        zp = vals[q.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    by_op = {}
    for dq in dqs:
        layer = consumers[dq.output[0]]
        if layer.input[1] == dq.output[0]:  # the weight input
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            by_op[layer.op_type] = (axis, vals[dq.input[1]].size)
    assert by_op["Conv"] == (0, 8)
    assert by_op["ConvTranspose"] == (1, 4)
    assert by_op["Gemm"][0] == 0 and by_op["Gemm"][1] == 3


def test_scales_equal_amax_over_127(exported):
    proto, model = exported
    vals = _const_values(proto.graph)
    amax = float(model[0]._input_quantizer.amax)
    first_q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "images")
    scale = vals[first_q.input[1]]
    assert scale.ndim == 0  # per-tensor scales must be scalars for TensorRT
    assert float(scale) == pytest.approx(amax / 127, rel=1e-6)


def test_cli_refuses_low_opset_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_main(["--checkpoint", str(tmp_path / "x.pt"), "-o", str(tmp_path / "m.onnx"), "--opset", "11"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "opset 11" in err[0] and "--opset 13" in err[0]


def test_cli_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("garbage")
    with pytest.raises(SystemExit) as exc:
        export_main(["--checkpoint", str(bad), "-o", str(tmp_path / "m.onnx")])
    assert exc.value.code == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
