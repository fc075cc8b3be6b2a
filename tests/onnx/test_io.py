"""trt_qat.onnx.io: the one ONNX loader and the facts read from a graph."""
from __future__ import annotations

import pytest
from fixtures_onnx import make_qdq_convnet

from trt_qat.errors import TrtQatError
from trt_qat.onnx import io


# --- -----------------------------------------------------------------------------------------
def test_onnx_facts(qdq_onnx, fp32_onnx):
    model = io.load_onnx(qdq_onnx)
    assert io.has_qdq(model) and io.has_qdq(qdq_onnx)
    assert not io.has_qdq(fp32_onnx)
    assert io.onnx_opset(model) == 13
    assert io.onnx_inputs(model) == {"images": [None, 3, 8, 8]}
    static = io.load_onnx(make_qdq_convnet(qdq_onnx.with_name("static.onnx"), batch=2))
    assert io.onnx_inputs(static) == {"images": [2, 3, 8, 8]}


def test_load_onnx_refuses_bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\x12\xff\xff\xff garbage")
    with pytest.raises(TrtQatError, match="corrupt or not an ONNX model"):
        io.load_onnx(corrupt)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(TrtQatError, match="not an ONNX model"):
        io.load_onnx(empty)
    with pytest.raises(TrtQatError, match="does not exist"):
        io.load_onnx(tmp_path / "missing.onnx")
