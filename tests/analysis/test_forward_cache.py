"""The forward cache: reused upstream outputs give exactly the same scores, and its wrappers go away."""
import pytest
import torch
from fixtures_sensitivity import assert_untouched, hostile_model, images, snapshot, sqnr_fn

from trt_qat.analysis.forward_cache import ForwardCache
from trt_qat.analysis.sensitivity import layer_sensitivity
from trt_qat.analysis.toggle import layers_in_float


@pytest.mark.parametrize("mode", ["leave-one-out", "only-one"])
def test_forward_cache_gives_the_same_scores(mode):
    model = hostile_model()
    snap = snapshot(model)
    metric = sqnr_fn(model)
    results = layer_sensitivity(model, metric, mode, progress=False)
    # the forward cache (reusing upstream outputs) gives exactly the same scores
    plain = layer_sensitivity(model, metric, mode, progress=False, cache_mb=0)
    assert {r["layer"]: r["score"] for r in plain} == {r["layer"]: r["score"] for r in results}
    assert_untouched(model, snap)
    assert "forward" not in model.c2.__dict__   # the cache's wrappers are gone


def test_forward_cache_reuses_only_what_is_upstream_of_the_changed_layer():
    model = hostile_model()
    x = images(4)
    with torch.no_grad():
        with layers_in_float(model, ["c4"]):
            expected = model(x)
        with ForwardCache(model, 64) as cache:
            cache.start(recording=True)
            model(x)
            cache.start(changed=["c4"])
            with layers_in_float(model, ["c4"]):
                out = model(x)
    assert torch.equal(out, expected)
    assert (cache.calls, cache.hits) == (6, 5)   # c1, c2, pool, c3a, c3b reused; c4 recomputed
    assert not cache.records and "forward" not in model.c1.__dict__
