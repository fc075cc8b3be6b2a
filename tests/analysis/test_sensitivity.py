"""Per-layer sensitivity: ranking, restoring, shared quantizers and auto-skip."""
import re

import pytest
from fixtures_sensitivity import assert_untouched, hostile_model, snapshot, sqnr_fn
from torch import nn

import trt_qat
from trt_qat.analysis.sensitivity import auto_skip, layer_sensitivity, skip_patterns
from trt_qat.analysis.toggle import list_layers


@pytest.mark.parametrize("mode", ["leave-one-out", "only-one"])
def test_hostile_layer_ranked_first_and_model_restored(mode):
    model = hostile_model()
    snap = snapshot(model)
    metric = sqnr_fn(model)
    results = layer_sensitivity(model, metric, mode, progress=False)
    assert [r["mode"] for r in results] == [mode] * 6
    assert sorted(r["layer"] for r in results) == sorted(list_layers(model))
    assert results[0]["layer"] == "c2"
    assert results[0]["delta"] > 10 + results[1]["delta"]     # by a wide margin (dB)
    assert [r["delta"] for r in results] == sorted((r["delta"] for r in results), reverse=True)
    assert_untouched(model, snap)
    # the forward cache giving the same scores: test_forward_cache.py


def test_leave_one_out_keeps_other_layers_quantized():
    model = hostile_model()
    shared = model.c3a._input_quantizer
    seen = {}

    def metric(m):
        floated = [n for n, mod in m.named_modules() if isinstance(getattr(mod, "_input_quantizer", None),
                                                                   nn.Identity)]
        seen[tuple(floated)] = m.c3b._input_quantizer is shared
        return 0.0

    layer_sensitivity(model, metric, "leave-one-out", layers=["c3a", "c4"], progress=False)
    assert seen == {(): True, ("c3a",): True, ("c4",): True}
    seen.clear()
    layer_sensitivity(model, metric, "only-one", layers=["c3b"], progress=False)
    assert seen == {("c1", "c2", "pool", "c3a", "c3b", "c4"): False, ("c1", "c2", "pool", "c3a", "c4"): True}


def test_auto_skip_reaches_target_with_the_hostile_layer():
    model = hostile_model()
    snap = snapshot(model)
    metric = sqnr_fn(model)
    ranking = layer_sensitivity(model, metric, "leave-one-out", progress=False)
    quantized = ranking[0]["baseline"]
    goal = (quantized + ranking[0]["score"]) / 2          # reachable by floating c2 only
    skip = auto_skip(model, metric, goal, 0.0, ranking, restore=True, progress=False)
    assert skip == ["^c2$"] and auto_skip.last["reached"] and auto_skip.last["score"] >= goal
    assert_untouched(model, snap)
    assert metric(model) == pytest.approx(quantized)
    # applied: c2 keeps disabled copies of its quantizers; everything else (and the shared one) stays enabled
    keys = set(model.state_dict())
    skip = auto_skip(model, metric, goal, 0.0, ranking, progress=False)
    assert skip == ["^c2$"] and metric(model) >= goal
    assert model.c2._input_quantizer is not snap[("c2", "_input_quantizer")][0]
    assert model.c2._input_quantizer._disabled and model.c2._weight_quantizer._disabled
    assert not snap[("c2", "_input_quantizer")][0]._disabled
    assert list_layers(model) == ["c1", "pool", "c3a", "c3b", "c4"]
    assert set(model.state_dict()) == keys   # same keys: a checkpoint saved now loads into the same architecture
    assert all(re.fullmatch(p, "c2") for p in skip) and not re.search(skip[0], "c2x")


def test_auto_skip_greedy_order_and_already_within_target():
    model = hostile_model()
    cost = {"c1": 1.0, "c2": 5.0, "pool": 0.5, "c3a": 2.0, "c3b": 0.1, "c4": 0.0}

    def metric(m):   # 10 minus the cost of every still-quantized layer; FP32 = 10
        return 10.0 - sum(cost[n] for n in list_layers(m))

    ranking = ["c2", "c3a", "c1", "pool", "c3b", "c4"]
    assert auto_skip(model, metric, 10.0, 1.0, ranking, restore=True, progress=False) == ["^c2$", "^c3a$", "^c1$"]
    assert auto_skip.last["score"] == pytest.approx(9.4)
    assert auto_skip(model, metric, 10.0, 9.0, ranking, restore=True, progress=False) == []
    assert skip_patterns(["a.b"]) == [r"^a\.b$"]
    with pytest.raises(trt_qat.TrtQatError, match=">= 0"):
        auto_skip(model, metric, 10.0, -1.0, ranking)
