"""FP16 ONNX conversion for strongly typed builds: Q/DQ intact, ORT runs it, outputs match FP32 within FP16
tolerance. All on CPU."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trt_qat.errors import TrtQatError
from trt_qat.onnx.fp16 import convert_to_fp16, qdq_parameters


def make_two_block_qdq_net(path):
    """images -> Q/DQ -> Conv(DQ int8 w, axis 0) -> Relu -> Q/DQ -> Conv(DQ int8 w) -> Sigmoid*x -> MaxPool -> out.
    Activation scales are shared between each Q and its DQ, as pytorch-quantization exports them."""
    rng = np.random.default_rng(7)
    inits, nodes = [], []

    def conv_weights(name, cout, cin):
        wq = rng.integers(-127, 128, size=(cout, cin, 3, 3)).astype(np.int8)
        scale = ((rng.random(cout) + 0.5) / (127 * 3 * np.sqrt(cin))).astype(np.float32)
        inits.extend([numpy_helper.from_array(wq, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_scale"),
                      numpy_helper.from_array(np.zeros(cout, np.int8), f"{name}_zp"),
                      numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.05, f"{name}_b")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_w"],
                                      name=f"{name}_dqw", axis=0))

    def act_qdq(name, x, scale):
        inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                      numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")])
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"],
                                      name=f"{name}_dq"))
        return f"{name}_dq"

    x = act_qdq("in", "images", 4.0 / 127)
    conv_weights("c1", 8, 3)
    nodes += [helper.make_node("Conv", [x, "c1_w", "c1_b"], ["c1_out"], pads=[1, 1, 1, 1], name="c1"),
              helper.make_node("Relu", ["c1_out"], ["r1"], name="r1")]
    x = act_qdq("a1", "r1", 3.0 / 127)
    conv_weights("c2", 8, 8)
    nodes += [helper.make_node("Conv", [x, "c2_w", "c2_b"], ["c2_out"], pads=[1, 1, 1, 1], name="c2"),
              helper.make_node("Sigmoid", ["c2_out"], ["sig"], name="sig"),
              helper.make_node("Mul", ["c2_out", "sig"], ["silu"], name="silu"),
              helper.make_node("MaxPool", ["silu"], ["out"], kernel_shape=[2, 2], strides=[2, 2], name="pool")]
    graph = helper.make_graph(nodes, "two_block",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def qdq_net(tmp_path):
    return make_two_block_qdq_net(tmp_path / "net_qdq.onnx")


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def test_fp16_conversion_keeps_qdq_and_matches_fp32(qdq_net, tmp_path):
    out_path = convert_to_fp16(qdq_net, tmp_path / "net_qdq_fp16.onnx")
    assert out_path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind
    src, dst = onnx.load(str(qdq_net)), onnx.load(str(out_path))
    onnx.checker.check_model(dst)

    # the same Q/DQ nodes, each reading the same scale / zero-point tensors, unchanged in type and value
    def qdq_nodes(m):
        return sorted((n.op_type, n.name, tuple(n.input[1:])) for n in m.graph.node
                      if n.op_type in ("QuantizeLinear", "DequantizeLinear"))

    assert qdq_nodes(dst) == qdq_nodes(src) and len(qdq_nodes(src)) == 6
    before, after = qdq_parameters(src), qdq_parameters(dst)
    assert set(before) == set(after) and len(before) == 8
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        np.testing.assert_array_equal(after[name], value)
    assert all(after[n].dtype == np.float32 for n in after if n.endswith(("_scale", "_s")))
    inits = {i.name: i.data_type for i in dst.graph.initializer}
    assert inits["c1_q"] == TensorProto.INT8 and inits["c1_b"] == TensorProto.FLOAT16  # float weights -> FP16
    # I/O types kept
    assert dst.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert dst.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    # the compute in between is FP16
    assert any(n.op_type == "Cast" for n in dst.graph.node)

    x = np.random.default_rng(0).uniform(-3, 3, size=(2, 3, 16, 16)).astype(np.float32)
    ref, got = _run(qdq_net, x), _run(out_path, x)
    assert got.dtype == np.float32 and got.shape == ref.shape == (2, 8, 8, 8)
    scale = float(np.abs(ref).max())
    assert scale > 0.1
    # FP16 tolerance; a value near a rounding boundary may flip one INT8 step of the second Q (3/127)
    err = np.abs(got - ref)
    assert float(err.max()) <= 3.0 / 127 * 1.5 + 1e-2 * scale
    assert float(err.mean()) < 5e-3 * scale
    cos = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cos > 0.9995


def test_fp16_default_path_and_errors(qdq_net, tmp_path):
    out = convert_to_fp16(qdq_net)
    assert out.name == "net_qdq_fp16.onnx" and out.parent == qdq_net.parent
    with pytest.raises(TrtQatError, match="overwrite its input"):
        convert_to_fp16(qdq_net, qdq_net)
    with pytest.raises(TrtQatError, match="does not exist"):
        convert_to_fp16(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not onnx")
    with pytest.raises(TrtQatError, match="cannot be read as ONNX"):
        convert_to_fp16(bad)
    with pytest.raises(TrtQatError, match="unknown FP16 conversion backend"):
        convert_to_fp16(qdq_net, tmp_path / "x.onnx", backend="magic")


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is not None, reason="nvidia-modelopt is installed")
def test_modelopt_backend_missing_says_how_to_install(qdq_net, tmp_path):
    with pytest.raises(TrtQatError, match="nvidia-modelopt"):
        convert_to_fp16(qdq_net, tmp_path / "m.onnx", backend="modelopt")


def test_fp16_reads_external_data_and_constant_node_parameters(qdq_net, tmp_path):
    """Weights stored beside the model (external data) are loaded and written back inline; Q/DQ parameters given
    by Constant nodes count like initializers."""
    before = qdq_parameters(onnx.load(str(qdq_net)))
    ext = tmp_path / "ext" / "net.onnx"
    ext.parent.mkdir()
    onnx.save(onnx.load(str(qdq_net)), str(ext), save_as_external_data=True, location="net.data", size_threshold=0)
    out = convert_to_fp16(ext, tmp_path / "net_fp16.onnx")
    after = qdq_parameters(onnx.load(str(out), load_external_data=False))
    assert set(before) == set(after) and len(before) == 8
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)

    nodes = [helper.make_node("Constant", [], ["s"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [0.5])),
             helper.make_node("Constant", [], ["f"], value_float=0.5),  # not a tensor-valued Constant: skipped
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "f", ""], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array(0, np.int8), "z")])
    params = qdq_parameters(helper.make_model(graph))
    assert set(params) == {"s", "z"} and params["s"].dtype == np.float32 and float(params["s"]) == 0.5
