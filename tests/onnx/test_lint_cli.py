"""`trt-qat lint` (trt_qat.cli.lint): table, JSON, --strict, --skip, and one-line errors for bad input."""
from __future__ import annotations

import json

import onnx
import pytest
from fixtures_lint import GraphBuilder, two_conv_graph

from trt_qat.cli.lint import main
from trt_qat.errors import TrtQatError
from trt_qat.onnx.lint import lint_onnx


def test_cli_json_strict_and_table(tmp_path, capsys):
    good = tmp_path / "good.onnx"
    onnx.save(two_conv_graph(), str(good))
    out = tmp_path / "sub" / "report.json"
    assert main([str(good), "--json", str(out), "--skip", "conv2"]) == 0
    printed = capsys.readouterr().out
    assert "conv2" in printed and "float-by-choice" in printed and "coverage" in printed.splitlines()[-1]
    data = json.loads(out.read_text())
    assert data["stats"]["int8_coverage_excluding_skipped"] == pytest.approx(1.0)
    assert {"severity", "code", "node", "message", "fix", "op", "reformat"} <= set(data["findings"][0])
    assert not list(out.parent.glob("*.tmp"))

    b = GraphBuilder(opset=12)
    b.output(b.conv(b.input("x", [1, 3, 8, 8]), 3, 4, name="c"))
    bad = tmp_path / "bad.onnx"
    onnx.save(b.model(), str(bad))
    assert main([str(bad)]) == 0  # errors alone do not fail without --strict
    with pytest.raises(SystemExit) as exc:
        main([str(bad), "--strict"])
    assert exc.value.code == 1
    assert main([str(good), "--strict"]) == 0


@pytest.mark.parametrize("content", [b"\x08\x07garbage\xff\xfe not onnx at all", b""])
def test_corrupt_or_missing_input(tmp_path, capsys, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(TrtQatError):
        lint_onnx(path)
    with pytest.raises(SystemExit) as exc:
        main([str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trt_qat: error:")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing.onnx")])
    assert exc.value.code == 2
