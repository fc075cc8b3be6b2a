"""trt.util: importing tensorrt says how to get it when it is missing; GPU probing never raises."""
from __future__ import annotations

import importlib.util

import pytest

from trt_qat.errors import TrtQatError
from trt_qat.trt.util import TRT_INSTALL_HINT, gpu_info, import_tensorrt

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_import_tensorrt_missing_says_how_to_get_it():
    with pytest.raises(TrtQatError) as exc:
        import_tensorrt()
    assert str(exc.value) == TRT_INSTALL_HINT
    assert "docker/README.md" in TRT_INSTALL_HINT and "pypi.nvidia.com" in TRT_INSTALL_HINT


def test_gpu_info_always_answers():
    info = gpu_info()
    assert set(info) == {"name", "compute_capability"}
    assert isinstance(info["name"], str) and info["name"]
    if info["compute_capability"] is None:
        assert info["name"] == "unknown"
    else:
        major, minor = str(info["compute_capability"]).split(".")
        assert major.isdigit() and minor.isdigit()
