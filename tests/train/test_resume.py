"""A killed run resumes exactly: the final weights equal an uninterrupted run's, bit for bit (QAT and FP32 training),
because last.pt holds every random state the next epoch draws from (torch's RNG, the sampler's generator) and the
hooks' state (the EMA)."""
import pytest
import torch
from fixtures_data import tiny_digits_yaml  # noqa: F401  (pytest fixture)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trt_qat
from trt_qat.config import QuantConfig
from trt_qat.errors import TrtQatError


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2))
    trt_qat.quantize(model, QuantConfig(rules=False))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 2, (24,), generator=g)
    trt_qat.calibrate(model, [x[:8]], method="max", progress=False)
    torch.manual_seed(1)  # as the CLI does: the shuffled order (and dropout, augmentation) come from the seed
    return model, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


def _loss(m, batch):
    return nn.functional.cross_entropy(m(batch[0]), batch[1])


class _KillAtEpoch:
    """A hook that raises KeyboardInterrupt when epoch ``n`` (0-based) starts: a run killed between epochs."""

    def __init__(self, n):
        self.n = n

    def on_epoch_start(self, loop):
        if loop.epoch == self.n:
            raise KeyboardInterrupt("killed")


def _eval(m):
    return float(m[0].weight.detach().abs().mean())


def test_killed_qat_run_resumes_bit_for_bit(tmp_path):
    ref, data = _model()
    trt_qat.finetune(ref, data, _loss, epochs=3, lr=1e-2, eval_fn=_eval, checkpoint_dir=tmp_path / "ref",
                     progress=False)

    model, data = _model()
    with pytest.raises(KeyboardInterrupt):
        trt_qat.finetune(model, data, _loss, epochs=3, lr=1e-2, eval_fn=_eval, checkpoint_dir=tmp_path / "run",
                         progress=False, extra_hooks=[_KillAtEpoch(2)])
    resumed, data = _model()
    res = trt_qat.finetune(resumed, data, _loss, epochs=3, lr=1e-2, eval_fn=_eval, checkpoint_dir=tmp_path / "run",
                           progress=False)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    want, got = ref.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    for name in ("best.pt", "last.pt"):
        a = torch.load(tmp_path / "ref" / name, weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "run" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_restores_the_data_order_not_a_replay_of_epoch_one(tmp_path):
    """The defect this guards against: the resumed epoch replayed epoch 1's shuffled order."""
    seen = []

    def recording_loss(m, batch):
        seen.append(batch[1].tolist())
        return _loss(m, batch)

    ref, data = _model()
    trt_qat.finetune(ref, data, recording_loss, epochs=2, lr=1e-2, checkpoint_dir=tmp_path / "ref", progress=False)
    uninterrupted, seen[:] = list(seen), []
    model, data = _model()
    with pytest.raises(KeyboardInterrupt):
        trt_qat.finetune(model, data, recording_loss, epochs=2, lr=1e-2, checkpoint_dir=tmp_path / "run",
                         progress=False, extra_hooks=[_KillAtEpoch(1)])
    resumed, data = _model()
    trt_qat.finetune(resumed, data, recording_loss, epochs=2, lr=1e-2, checkpoint_dir=tmp_path / "run",
                     progress=False)
    assert seen == uninterrupted
    assert uninterrupted[:6] != uninterrupted[6:]  # the two epochs' orders differ, so a replay would show


def test_killed_fp32_training_resumes_bit_for_bit(tiny_digits_yaml, tmp_path, monkeypatch):  # noqa: F811
    from trt_qat.measure import evaluate as evaluate_module
    from trt_qat.train.fp32 import last_checkpoint_path, train_fp32

    kwargs = dict(epochs=3, batch_size=4, imgsz=64, seed=3, eval_every=1, threads=1)
    ref = train_fp32(tiny_digits_yaml, out=tmp_path / "ref.pt", **kwargs)

    real, calls = evaluate_module.evaluate, {"n": 0}

    def dying_evaluate(*args, **kw):  # killed while evaluating epoch 2: last.pt holds epoch 1
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(evaluate_module, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train_fp32(tiny_digits_yaml, out=tmp_path / "run.pt", **kwargs)
    assert last_checkpoint_path(tmp_path / "run.pt").is_file()
    monkeypatch.setattr(evaluate_module, "evaluate", real)
    res = train_fp32(tiny_digits_yaml, out=tmp_path / "run.pt", **kwargs)
    assert res["history"] == ref["history"]
    a = torch.load(tmp_path / "ref.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not last_checkpoint_path(tmp_path / "run.pt").exists()  # a finished run leaves nothing to resume


def test_diverging_qat_stops_with_one_line():
    model, data = _model()

    def runaway(m, batch):  # a loss whose gradient step makes it grow: the run diverges within a few steps
        return m(batch[0]).pow(2).sum()

    with pytest.raises(TrtQatError, match="diverged.*lower --lr") as err:
        trt_qat.finetune(model, data, runaway, epochs=3, lr=1.0, progress=False,
                         config=trt_qat.QATConfig(grad_clip=None))
    assert "\n" not in str(err.value)
