"""trt_qat.onnx.lint.core (lint_onnx) end to end: a real pytorch-quantization export, models given in memory or
as files."""
from __future__ import annotations

import onnx
import pytest
from fixtures_lint import codes, two_conv_graph

from trt_qat.errors import TrtQatError
from trt_qat.onnx.lint import lint_onnx

# ----------------------------------------------------------------------------- a real pytorch-quantization export


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_quantization")
    from pytorch_quantization import nn as qnn
    from pytorch_quantization.nn import TensorQuantizer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = qnn.QuantConv2d(3, 8, 3, padding=1)
            self.c2 = qnn.QuantConv2d(3, 8, 3, padding=1)
            self.c3 = qnn.QuantConv2d(16, 4, 1)
            self.side = qnn.QuantConv2d(8, 4, 1)  # quantizes c1's output with its own scale (naive placement)
            self.up = qnn.QuantConvTranspose2d(4, 6, 2, stride=2)

        def forward(self, x):
            y1 = self.c1(x)
            return self.up(self.c3(torch.cat([y1, self.c2(x)], 1))), self.side(y1)

    torch.manual_seed(0)
    model = Tiny().eval()
    amax = {"c1": 2.0, "c2": 2.0, "c3": 3.0, "side": 5.0, "up": 1.0}
    for name, mod in model.named_children():
        mod.input_quantizer.amax = torch.tensor(amax[name])
        w = mod.weight.detach()
        axis = mod.weight_quantizer.axis
        axis = axis if isinstance(axis, int) else axis[0]
        dims = [d for d in range(w.dim()) if d != axis]
        mod.weight_quantizer.amax = w.abs().amax(dim=dims, keepdim=True)
    path = tmp_path_factory.mktemp("export") / "tiny_qdq.onnx"
    old = TensorQuantizer.use_fb_fake_quant
    TensorQuantizer.use_fb_fake_quant = True
    try:
        torch.onnx.export(model, torch.randn(1, 3, 16, 16), str(path), opset_version=13, dynamo=False,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}})
    finally:
        TensorQuantizer.use_fb_fake_quant = old
    return path


@pytest.mark.filterwarnings("ignore")
def test_real_pytorch_quantization_export(real_export):
    report = lint_onnx(real_export)
    by_op = {}
    for f in report.findings:
        by_op.setdefault(f.op, []).append(f.code)
    assert report.stats["weighted_layers"] == 5 and report.stats["int8_layers"] == 5
    assert report.stats["int8_coverage"] == pytest.approx(1.0)
    expected = 16 * 16 * (8 * 3 * 9 * 2 + 4 * 16 + 4 * 8) + 16 * 16 * 4 * 6 * 4
    assert report.stats["total_macs"] == expected
    # Scales are Constant nodes: read by value. c1's output is quantized by `side` at 5/127 while the Concat's
    # consumer (c3) uses 3/127: a naive-placement mismatch.
    assert [f.node for f in report.by_code("concat-scale-mismatch")] == ["/Concat"]
    # pytorch-quantization 2.1.3 exports QuantConvTranspose2d weights along axis 0; TensorRT wants axis 1.
    assert [f.op for f in report.by_code("wrong-weight-axis")] == ["ConvTranspose"]
    assert not any(c in ("dangling-q", "dangling-dq", "nonzero-zero-point", "opset-too-low", "scale-not-constant")
                   for c in codes(report))


def test_model_in_memory_or_as_a_file(tmp_path):
    model = two_conv_graph()
    in_memory = lint_onnx(model)
    assert in_memory.model == "<ModelProto>"
    path = tmp_path / "net.onnx"
    onnx.save(model, str(path))
    from_file = lint_onnx(path)
    assert from_file.model == str(path) and lint_onnx(str(path)).model == str(path)
    assert from_file.to_dict()["findings"] == in_memory.to_dict()["findings"]
    assert from_file.stats == in_memory.stats
    # weights stored as external data are read too (the linter needs the weight values)
    ext = tmp_path / "ext" / "net.onnx"
    ext.parent.mkdir()
    onnx.save(model, str(ext), save_as_external_data=True, location="net.data", size_threshold=0)
    assert (ext.parent / "net.data").is_file()
    assert lint_onnx(ext).to_dict()["findings"] == in_memory.to_dict()["findings"]


def test_error_messages(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(TrtQatError) as exc:
        lint_onnx(missing)
    assert str(exc.value) == f"ONNX model '{missing}' does not exist; pass the path of an exported .onnx file"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage\xff\xfe not onnx at all")
    with pytest.raises(TrtQatError) as exc:
        lint_onnx(corrupt)
    assert str(exc.value).startswith(f"cannot read ONNX model '{corrupt}' (DecodeError: ")
    assert str(exc.value).endswith("); check that the file is a complete ONNX export (re-export it if it was "
                                   "truncated)")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(TrtQatError) as exc:
        lint_onnx(empty)
    assert str(exc.value) == (f"ONNX model '{empty}' has no graph nodes; check that the file is an ONNX model "
                              "and not a checkpoint or an engine")
    with pytest.raises(TrtQatError, match=r"^invalid --skip regular expression \(.*\); quote it and escape"):
        lint_onnx(two_conv_graph(), skip_nodes=["("])
