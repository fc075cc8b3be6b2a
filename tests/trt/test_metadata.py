"""trt.metadata: the <engine>.json sidecar (path, read, corrupt file), the TensorRT/GPU match check, and the
ONNX sha256."""
from __future__ import annotations

import hashlib
import json

import pytest

from trt_qat.errors import TrtQatError
from trt_qat.trt.metadata import check_engine_metadata, file_sha256, metadata_path, read_engine_metadata

META = {"engine": "net.engine", "onnx": "net.onnx", "precision": "int8", "trt_version": "10.3.0.26",
        "gpu_name": "Orin", "compute_capability": "8.7"}


def test_check_engine_metadata():
    assert check_engine_metadata(META, "10.3.0.26", "Orin", "8.7") == []
    assert check_engine_metadata(META, "10.3.0.30", "Orin", (8, 7)) == []  # same major.minor.patch
    with pytest.raises(TrtQatError, match="built with TensorRT 10.3.0.26 but this is TensorRT 8.6.2.3") as exc:
        check_engine_metadata(META, "8.6.2.3", "Orin", "8.7")
    assert "python -m trt_qat.build_engine --onnx net.onnx --precision int8" in str(exc.value)
    with pytest.raises(TrtQatError, match="compute capability 8.7"):
        check_engine_metadata(META, "10.3.0.26", "NVIDIA A100", "8.0")
    warnings = check_engine_metadata(META, "10.3.0.26", "Other Orin", "8.7")
    assert len(warnings) == 1 and "Other Orin" in warnings[0]
    assert "no metadata" in check_engine_metadata(None, "10.3", "x", "8.7")[0]


def test_metadata_files(tmp_path):
    engine = tmp_path / "a.engine"
    assert metadata_path(engine).name == "a.engine.json"
    assert read_engine_metadata(engine) is None
    metadata_path(engine).write_text(json.dumps(META))
    assert read_engine_metadata(engine)["trt_version"] == "10.3.0.26"
    metadata_path(engine).write_text("{not json")
    with pytest.raises(TrtQatError, match="cannot be read"):
        read_engine_metadata(engine)


def test_file_sha256_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 8193  # a little over 2 MiB: crosses the 1 MiB chunk boundary twice
    path = tmp_path / "blob.onnx"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
