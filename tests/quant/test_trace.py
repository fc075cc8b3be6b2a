"""trt_qat.quant.trace: the recorded dataflow of one forward and the queries on it, without applying any rule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trt_qat
from trt_qat.config import QuantConfig
from trt_qat.errors import TrtQatError
from trt_qat.quant.trace import (
    UnionFind,
    category,
    from_quantized_weighted,
    is_ancestor,
    producer_site,
    slot_nodes,
    trace,
)


def _names(model):
    names = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)
    return names


def _trace(model, shape=(1, 3, 8, 8)):
    return trace(model, torch.zeros(shape), _names(model))


class Ops(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, x):
        h = self.conv(x)
        a = F.max_pool2d(h, 3, 1, 1)
        b = F.interpolate(self.pool(h), scale_factor=1, mode="nearest")
        c = torch.cat((a, b), 1).view(1, 8, 8, 8)
        d = F.pad(c, (1, 1, 1, 1)) + F.pad(c, (1, 1, 1, 1), value=1.0)
        return self.up(d) * 2


def test_categories_of_functions_and_modules():
    rec = _trace(Ops().eval())
    # (the name torch reports for ``+`` and ``*`` varies: add/__add__, mul/__mul__)
    assert [category(n) for n in rec.nodes] == ["other", "maxpool", "maxpool", "resize", "concat", "move", "move",
                                                "other", "add", "other", "other"]
    assert [n.name for n in rec.nodes][:8] == ["Conv2d", "max_pool2d", "MaxPool2d", "interpolate", "cat", "view",
                                               "pad", "pad"]
    conv = rec.nodes[0]
    assert conv.kind == "module" and conv.call == 0 and rec.values[conv.inputs[0]].kind == "input"


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.c1(x)
        out = self.c2(y)
        out += y  # in place: ``out`` gets a new version, produced by the add
        return self.act(out)


def test_in_place_ops_get_new_versions_and_ancestry_follows_them():
    model = InPlace().eval()
    rec = _trace(model)
    (add,) = [n for n in rec.nodes if category(n) == "add"]
    conv_out, skip = add.inputs
    assert rec.nodes[rec.values[skip].producer].module is model.c1
    assert is_ancestor(rec, skip, conv_out) and not is_ancestor(rec, conv_out, skip)
    relu = rec.nodes[-1]
    assert relu.module is model.act and relu.inputs == add.outputs  # reads the new version, not c2's output
    assert rec.values[relu.outputs[0]].producer == relu.idx


class TwoCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(self.act(x)))


def test_module_calls_are_counted_and_returned_values_have_a_site():
    model = TwoCalls().eval()
    rec = _trace(model)
    acts = [n for n in rec.nodes if n.module is model.act]
    assert [n.call for n in acts] == [0, 1] and rec.calls[id(model.act)] == 2
    assert producer_site(rec, acts[0].outputs[0]) == (model.act, 0, ())
    assert producer_site(rec, acts[1].outputs[0])[:2] == (model.act, 1)


def test_quantized_layers_are_opaque_slots_and_epilogues_are_walked_through():
    model = trt_qat.quantize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(),
                                           nn.Conv2d(4, 4, 1)), QuantConfig(rules=False)).eval()
    rec = _trace(model)
    assert [n.name for n in rec.nodes] == ["QuantConv2d", "BatchNorm2d", "SiLU", "QuantConv2d"]
    assert [n.module for n in slot_nodes(rec)] == [model[0], model[3]]
    assert from_quantized_weighted(rec, rec.nodes[2].outputs[0])  # conv -> bn -> silu
    assert not from_quantized_weighted(rec, rec.nodes[0].inputs[0])  # the model input


def test_trace_restores_the_model_and_reports_a_bad_input():
    model = trt_qat.quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantConfig(rules=False)).train()
    quantizers = [q for _, q in trt_qat.iter_quantizers(model)]
    quantizers[0].disable()
    before = [q._disabled for q in quantizers]
    _trace(model)
    assert model.training and [q._disabled for q in quantizers] == before
    with pytest.raises(TrtQatError, match="sample input"):
        _trace(model, (1, 5, 8, 8))
    assert model.training and [q._disabled for q in quantizers] == before
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_union_find_keeps_the_earliest_index_as_root():
    uf = UnionFind(6)
    uf.union(4, 5)
    uf.union(5, 2)
    uf.union(3, 1)
    assert uf.find(5) == 2 and uf.find(4) == 2 and uf.find(3) == 1
    uf.union(4, 3)
    assert {uf.find(i) for i in (1, 2, 3, 4, 5)} == {1} and uf.find(0) == 0
