"""Small ONNX graphs built by code, shared by the runner, build, benchmark and compare tests."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_qdq_convnet(path, channels=4, size=8, opset=13, qdq=True, batch="batch"):
    """images[N,3,H,W] -> Q/DQ -> Conv (int8 per-channel weights via DQ axis 0) -> Relu -> Conv -> out.

    With ``qdq=False`` the same net in plain FP32 (float weights, no Q/DQ). ``batch`` is the batch dimension:
    a name (dynamic) or an int (static).
    """
    rng = np.random.default_rng(0)
    w_q = rng.integers(-127, 128, size=(channels, 3, 3, 3)).astype(np.int8)
    w_scale = (rng.random(channels).astype(np.float32) + 0.5) * 0.01
    w2 = rng.standard_normal((2, channels, 1, 1)).astype(np.float32) * 0.3
    inits = [
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) * 0.1, "b"),
        numpy_helper.from_array(w2, "w2"),
    ]
    if qdq:
        inits += [
            numpy_helper.from_array(np.array(0.02, np.float32), "act_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "act_zp"),
            numpy_helper.from_array(w_q, "w_q"),
            numpy_helper.from_array(w_scale, "w_scale"),
            numpy_helper.from_array(np.zeros(channels, np.int8), "w_zp"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["images", "act_scale", "act_zp"], ["xq"], name="q_in"),
            helper.make_node("DequantizeLinear", ["xq", "act_scale", "act_zp"], ["xdq"], name="dq_in"),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=0),
        ]
        conv_in = "xdq"
    else:
        w = w_q.astype(np.float32) * w_scale[:, None, None, None]
        inits.append(numpy_helper.from_array(w, "w"))
        nodes = []
        conv_in = "images"
    nodes += [
        helper.make_node("Conv", [conv_in, "w", "b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["out"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "qdq_net" if qdq else "fp32_net",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 2, size, size])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def qdq_onnx(tmp_path):
    """A small Q/DQ ONNX (dynamic batch) in the test's tmp_path."""
    return make_qdq_convnet(tmp_path / "net_qdq.onnx")


@pytest.fixture
def fp32_onnx(tmp_path):
    """The same small net in FP32, without Q/DQ."""
    return make_qdq_convnet(tmp_path / "net_fp32.onnx", qdq=False)
