"""QAT loop: frozen scales, cosine schedule, atomic checkpoints, best-epoch selection and resume after a kill."""
import pytest
import torch
from torch import nn

import trt_qat
from trt_qat.config import QATConfig, QuantConfig
from trt_qat.errors import TrtQatError
from trt_qat.train.loop import warmup_cosine


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2))
    trt_qat.quantize(model, QuantConfig(rules=False))
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(3)]
    trt_qat.calibrate(model, [x for x, _ in data], method="max", progress=False)
    return model, data


def loss_fn(m, batch):
    x, y = batch
    return nn.functional.cross_entropy(m(x), y)


def test_cosine_schedule():
    assert warmup_cosine(0, 10, 1.0, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(9, 10, 1.0, 0.01) == pytest.approx(0.01)
    vals = [warmup_cosine(s, 10, 1.0, 0.01) for s in range(10)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_scales_stay_frozen_and_bn_stats_fixed():
    model, data = _setup()
    amax = {n: q.amax.clone() for n, q in trt_qat.iter_quantizers(model)}
    bn_mean = model[1].running_mean.clone()
    trt_qat.finetune(model, data, loss_fn, epochs=1, lr=1e-2, progress=False)
    for n, q in trt_qat.iter_quantizers(model):
        assert torch.equal(q.amax, amax[n])
    assert torch.equal(model[1].running_mean, bn_mean)


def test_best_epoch_is_kept_and_restored(tmp_path):
    model, data = _setup()
    scores = iter([0.5, 0.9, 0.1])
    snapshots = []

    def eval_fn(m):
        snapshots.append(m[0].weight.detach().clone())
        return next(scores)

    res = trt_qat.finetune(model, data, loss_fn, epochs=3, lr=1e-2, eval_fn=eval_fn, checkpoint_dir=tmp_path,
                           progress=False)
    assert res["best_epoch"] == 2 and res["best_score"] == 0.9
    assert torch.equal(model[0].weight, snapshots[1])
    best, _ = trt_qat.load_quantized(tmp_path / "best.pt", model=_fresh())
    assert torch.equal(best[0].weight, snapshots[1])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def _fresh():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    # reference: 2 uninterrupted epochs
    ref_model, data = _setup()
    trt_qat.finetune(ref_model, data, loss_fn, epochs=2, lr=1e-2, progress=False)

    model, data = _setup()
    calls = {"n": 0}

    def dying_loss(m, batch):
        calls["n"] += 1
        if calls["n"] == len(data) + 2:  # in the middle of epoch 2
            raise KeyboardInterrupt("killed")
        return loss_fn(m, batch)

    with pytest.raises(KeyboardInterrupt):
        trt_qat.finetune(model, data, dying_loss, epochs=2, lr=1e-2, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "last.pt").is_file()

    resumed, data = _setup()
    res = trt_qat.finetune(resumed, data, loss_fn, epochs=2, lr=1e-2, checkpoint_dir=tmp_path, progress=False)
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    torch.testing.assert_close(resumed[0].weight, ref_model[0].weight)


def test_refuses_uncalibrated_model_and_bad_config():
    model = trt_qat.quantize(_fresh(), QuantConfig(rules=False))
    with pytest.raises(TrtQatError, match="never calibrated"):
        trt_qat.finetune(model, [1], loss_fn, epochs=1, progress=False)
    with pytest.raises(TrtQatError, match="qat.lr"):
        QATConfig(lr=-1)


def test_nan_loss_is_one_clear_error():
    model, data = _setup()
    with pytest.raises(TrtQatError, match="lower --lr"):
        trt_qat.finetune(model, data, lambda m, b: torch.tensor(float("nan")), epochs=1, progress=False)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path, caplog):
    model, data = _setup()
    trt_qat.finetune(model, data, loss_fn, epochs=1, lr=1e-2, checkpoint_dir=tmp_path, progress=False,
                     fingerprint="run-a")
    other, data = _setup()
    res = trt_qat.finetune(other, data, loss_fn, epochs=2, lr=1e-3, checkpoint_dir=tmp_path, progress=False,
                           fingerprint="run-b")
    assert [h["epoch"] for h in res["history"]] == [1, 2]  # started afresh
    assert "different run" in caplog.text
    same, data = _setup()
    res = trt_qat.finetune(same, data, loss_fn, epochs=2, lr=1e-3, checkpoint_dir=tmp_path, progress=False,
                           fingerprint="run-b")
    assert len(res["history"]) == 2 and torch.equal(same[0].weight, other[0].weight)  # resumed: nothing left to do


def test_unfrozen_scales_follow_the_weights():
    model, data = _setup()
    act_amax = float(model[0]._input_quantizer.amax)
    trt_qat.finetune(model, data, loss_fn, config=QATConfig(epochs=1, lr=1e-2, freeze_amax=False), progress=False)
    expected = model[0].weight.detach().abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(model[0]._weight_quantizer.amax.flatten(), expected)
    assert float(model[0]._input_quantizer.amax) == act_amax  # activation scales stay calibrated


def test_unresumable_last_checkpoint_is_one_clear_error(tmp_path):
    model, data = _setup()
    torch.save([1, 2], tmp_path / "last.pt")  # not a QAT checkpoint
    with pytest.raises(TrtQatError, match="not a trt_qat checkpoint"):
        trt_qat.finetune(model, data, loss_fn, epochs=1, checkpoint_dir=tmp_path, progress=False)
    torch.save({"amax": {}}, tmp_path / "last.pt")
    with pytest.raises(TrtQatError, match="not a QAT checkpoint"):
        trt_qat.finetune(model, data, loss_fn, epochs=1, checkpoint_dir=tmp_path, progress=False)
    # a QAT checkpoint of another architecture under the same (here: no) fingerprint
    other = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    trt_qat.quantize(other, QuantConfig(rules=False))
    trt_qat.calibrate(other, [x for x, _ in data], method="max", progress=False)
    trt_qat.finetune(other, data, loss_fn, epochs=1, checkpoint_dir=tmp_path / "o", progress=False)
    with pytest.raises(TrtQatError, match="different QAT run .*--no-resume"):
        trt_qat.finetune(model, data, loss_fn, epochs=2, checkpoint_dir=tmp_path / "o", progress=False)
    (tmp_path / "o" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrtQatError, match="delete .*last.pt"):
        trt_qat.finetune(model, data, loss_fn, epochs=2, checkpoint_dir=tmp_path / "o", progress=False)


@pytest.mark.parametrize("bad, msg", [({"max_steps_per_epoch": 0}, "max_steps_per_epoch"),
                                      ({"grad_clip": -1.0}, "grad_clip")])
def test_qat_config_refuses_bad_caps(bad, msg):
    with pytest.raises(TrtQatError, match=msg):
        QATConfig(**bad)
