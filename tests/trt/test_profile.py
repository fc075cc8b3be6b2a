"""trt.profile: trtexec shape flags, --batch, and the optimization profile checked against the ONNX's inputs."""
from __future__ import annotations

import pytest

from trt_qat.errors import TrtQatError
from trt_qat.trt.profile import parse_batch, parse_shapes, resolve_profile


def test_parse_shapes():
    assert parse_shapes("images:1x3x128x128") == {"images": (1, 3, 128, 128)}
    assert parse_shapes("'images':4x3x8x8, mask:1x1") == {"images": (4, 3, 8, 8), "mask": (1, 1)}
    assert parse_shapes("encoder:input:2x5") == {"encoder:input": (2, 5)}
    assert parse_shapes(None) == {} and parse_shapes("") == {}
    for bad, msg in (("images", "NAME:DxDxD"), ("images:1x3xAx8", "integers"), ("images:1x0x8", "<= 0"),
                     ("a:1x2,a:1x2", "twice"), (":1x2", "NAME:DxDxD")):
        with pytest.raises(TrtQatError, match=msg):
            parse_shapes(bad)


def test_parse_batch():
    assert parse_batch("1:8:16") == (1, 8, 16)
    assert parse_batch("4") == (4, 4, 4)
    assert parse_batch("1:16") == (1, 16, 16)
    for bad in ("a:b:c", "1:2:3:4", "8:4:16", "0:1:2"):
        with pytest.raises(TrtQatError):
            parse_batch(bad)


def test_resolve_profile():
    inputs = {"images": [None, 3, 8, 8]}
    assert resolve_profile(inputs, batch="1:4:8") == {
        "images": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))}
    assert resolve_profile(inputs, "images:1x3x8x8", "images:2x3x8x8", "images:4x3x8x8") == {
        "images": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))}
    # opt only: min = max = opt
    assert resolve_profile(inputs, opt_shapes="images:2x3x8x8")["images"] == ((2, 3, 8, 8),) * 3
    # dynamic batch and no flags: batch 1
    assert resolve_profile(inputs) == {"images": ((1, 3, 8, 8),) * 3}
    assert resolve_profile({"images": [1, 3, 8, 8]}) == {}
    cases = [
        (dict(min_shapes="x:1x3x8x8"), "unknown inputs"),
        (dict(opt_shapes="images:1x3x8"), "rank 3"),
        (dict(opt_shapes="images:1x3x9x8"), "fixes it at 8"),
        (dict(min_shapes="images:4x3x8x8", max_shapes="images:2x3x8x8", opt_shapes="images:3x3x8x8"), "min <= opt"),
        (dict(batch="1:2:4", opt_shapes="images:1x3x8x8"), "either --batch"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(TrtQatError, match=msg):
            resolve_profile(inputs, **kwargs)
    with pytest.raises(TrtQatError, match="dynamic non-batch"):
        resolve_profile({"images": [None, 3, None, None]}, batch="1:1:2")
    with pytest.raises(TrtQatError, match="dynamic dimensions"):
        resolve_profile({"images": [None, 3, None, None]})
    with pytest.raises(TrtQatError, match="fixed batch of 1"):
        resolve_profile({"images": [1, 3, 8, 8]}, batch="1:2:4")
