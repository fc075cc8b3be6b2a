"""torchrun with 2 CPU processes (gloo): calibration across ranks equals one process, DDP QAT keeps the ranks'
weights identical and only rank 0 writes; ``torchrun -m trt_qat qat`` runs end to end."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

METHODS = ("max", "percentile", "mse", "entropy")
N_IMAGES, RANK_BATCH = 24, 4

# one script run by each torchrun worker: calibrate its shard, save amax per method, QAT one epoch with DDP
WORKER = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sys.path.insert(0, sys.argv[2])
    import test_distributed as T
    from trt_qat import dist as D
    from trt_qat.calibration.calibrate import collect_stats, compute_amax
    from trt_qat.train.qat import finetune

    out = Path(sys.argv[1])
    rank, world, _ = D.init_distributed(backend="gloo")  # CPU tensors: gloo, also on a machine with GPUs
    assert world == 2 and D.is_distributed() and D.is_main_process() == (rank == 0)
    model, data = T.make_model(), T.make_data()
    shard = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=T.RANK_BATCH, sampler=shard)
    seen = collect_stats(model, loader, progress=False)
    amax = {m: compute_amax(model, m) for m in T.METHODS}
    torch.save({"amax": amax, "seen": seen}, out / f"amax_rank{rank}.pt")
    train = DataLoader(data, batch_size=T.RANK_BATCH,
                       sampler=DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0))
    result = finetune(model, train, T.loss_fn, epochs=1, lr=0.05, checkpoint_dir=out / f"ck{rank}", progress=False,
                      eval_fn=lambda m: float(rank == 0))
    torch.save({"state": model.state_dict(), "result": result}, out / f"weights_rank{rank}.pt")
    D.cleanup_distributed()
''')


def make_model():
    from trt_qat.config import QuantConfig
    from trt_qat.quant.instrument import quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.SiLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.SiLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))
    return quantize(model, QuantConfig(rules=False))


def make_data():
    g = torch.Generator().manual_seed(1)
    # a different spread per image, so the later batches grow the histograms past the first batch's range
    x = torch.randn(N_IMAGES, 3, 16, 16, generator=g) * torch.linspace(0.5, 3.0, N_IMAGES).view(-1, 1, 1, 1)
    y = torch.randint(0, 4, (N_IMAGES,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _torchrun(args, cwd, timeout=240, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(cwd), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    repo = str(Path(__file__).resolve().parents[2])
    _torchrun([str(script), str(out), os.path.dirname(os.path.abspath(__file__))], cwd=repo)
    return out


def test_two_ranks_calibrate_like_one_process_on_all_data(two_ranks):
    from torch.utils.data import DataLoader

    from trt_qat.calibration.calibrate import collect_stats, compute_amax

    ranks = [torch.load(two_ranks / f"amax_rank{r}.pt", weights_only=False) for r in range(2)]
    # one process, batch 2 x the per-rank batch: its k-th batch is the union of the ranks' k-th batches
    model = make_model()
    seen = collect_stats(model, DataLoader(make_data(), batch_size=2 * RANK_BATCH), progress=False)
    single = {m: compute_amax(model, m) for m in METHODS}
    assert ranks[0]["seen"] == ranks[1]["seen"] == 2 * seen
    for method in METHODS:
        assert ranks[0]["amax"][method] == ranks[1]["amax"][method], method
        assert ranks[0]["amax"][method] == single[method], method
    assert len(single["entropy"]) == 5
    from trt_qat.quant.quantizer import activation_quantizers

    # the later batches did grow the histograms: merging shards of different lengths was exercised
    assert any(q._calibrator.hist.numel() > 2048 for _, q in activation_quantizers(model))


def test_ddp_qat_keeps_ranks_identical_and_only_rank0_writes(two_ranks):
    w0 = torch.load(two_ranks / "weights_rank0.pt", weights_only=False)
    w1 = torch.load(two_ranks / "weights_rank1.pt", weights_only=False)
    assert w0["state"].keys() == w1["state"].keys()
    for k in w0["state"]:
        assert torch.equal(w0["state"][k], w1["state"][k]), k
    fresh = make_model().state_dict()
    assert any(not torch.equal(w0["state"][k], fresh[k]) for k in fresh if k.endswith("weight"))
    assert w0["result"]["history"] == [{**h, "seconds": w0["result"]["history"][0]["seconds"]}
                                       for h in w1["result"]["history"]]
    assert w0["result"]["best_score"] == w1["result"]["best_score"] == 1.0  # rank 0's score, broadcast
    assert (two_ranks / "ck0" / "last.pt").is_file() and (two_ranks / "ck0" / "best.pt").is_file()
    assert not (two_ranks / "ck1").exists()


def test_torchrun_trt_qat_calibrate_and_qat_cli(tmp_path, tiny_digits_yaml):
    from trt_qat.models.yolo import build_model, save_checkpoint

    repo = str(Path(__file__).resolve().parents[2])
    torch.manual_seed(0)
    fp32 = save_checkpoint(build_model("yolo-n"), tmp_path / "fp32.pt")
    from trt_qat.cli.calibrate import main as calibrate_main

    # --device cpu: the test runs its 2 ranks on the CPU (gloo) whatever GPUs the machine has
    common = ["--checkpoint", str(fp32), "--data", str(tiny_digits_yaml), "--method", "percentile", "--device", "cpu"]
    assert calibrate_main(common + ["--batch-size", "4", "--out", str(tmp_path / "calib1")]) == 0
    # two ranks with half the batch: their k-th batches together are the single process's k-th batch
    proc = _torchrun(["-m", "trt_qat", "calibrate"] + common + ["--batch-size", "2", "--out",
                                                                 str(tmp_path / "calib")], cwd=repo)
    assert proc.stdout.count("calibrated") == 1 and "(2 processes)" in proc.stdout
    one = torch.load(tmp_path / "calib1" / "amax.pt", weights_only=False)["amax"]
    two = torch.load(tmp_path / "calib" / "amax.pt", weights_only=False)["amax"]
    assert one.keys() == two.keys() and len(one) > 100
    for name in one:
        assert torch.equal(one[name], two[name]), name
    # fewer images than processes: every rank stops with one line, none waits in a collective
    proc = _torchrun(["-m", "trt_qat", "calibrate"] + common + ["--max-images", "1", "--out", str(tmp_path / "c0")],
                     cwd=repo, ok=False)
    assert proc.stderr.count("1 calibration images for 2 processes") == 2
    assert 'trt_qat/calibrate.py", line' not in proc.stderr  # (torchrun's own agent prints a traceback)
    proc = _torchrun(["-m", "trt_qat", "qat", "--checkpoint", str(tmp_path / "calib" / "quantized.pt"),
                      "--data", str(tiny_digits_yaml), "--epochs", "1", "--max-steps", "1", "--batch-size", "2",
                      "--device", "cpu", "--out", str(tmp_path / "qat")], cwd=repo)
    assert proc.stdout.count("QAT done") == 1 and "(2 processes)" in proc.stdout
    assert (tmp_path / "qat" / "last.pt").is_file()


def test_backend_and_device_for_torchrun(monkeypatch):
    from trt_qat import dist as D
    from trt_qat.errors import TrtQatError

    assert D.backend_for("cpu") == "gloo" and D.backend_for(None) is None
    assert D.distributed_device(None) is None and D.distributed_device("cpu") == torch.device("cpu")
    with pytest.raises(TrtQatError, match="unknown device 'gpu'"):
        D.backend_for("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (only the device checks are exercised)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.backend_for("cuda") is None  # init_distributed's default: NCCL where CUDA is available
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D, "get_world_size", lambda: 2)
    with pytest.raises(TrtQatError, match="every rank on one GPU"):
        D.distributed_device("cuda:0")
    with pytest.raises(TrtQatError, match="2 CUDA device"):
        D.distributed_device("cuda:5")
