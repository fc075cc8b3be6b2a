"""Putting layers in float: the layer list, restoring, and quantizers shared with other layers."""
import pytest
from fixtures_sensitivity import hostile_model
from torch import nn

import trt_qat
from trt_qat.analysis.toggle import layers_in_float, list_layers


def test_list_layers_and_layers_in_float_keeps_shared_quantizer():
    model = hostile_model()
    assert list_layers(model) == ["c1", "c2", "pool", "c3a", "c3b", "c4"]
    shared = model.c3a._input_quantizer
    with layers_in_float(model, ["c3a"]):
        assert isinstance(model.c3a._input_quantizer, nn.Identity)
        assert isinstance(model.c3a._weight_quantizer, nn.Identity)
        assert model.c3b._input_quantizer is shared and not shared._disabled   # the other layer stays quantized
        assert "c3a" not in list_layers(model)
    assert model.c3a._input_quantizer is shared
    with pytest.raises(trt_qat.TrtQatError, match="not quantized layers"):
        with layers_in_float(model, ["nope"]):
            pass
