"""Generic torchrun helpers: join and leave the process group, rank and device queries, small collectives.

``torchrun --nproc_per_node N -m trt_qat qat ...`` starts N processes; :func:`init_distributed` reads torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the group:
NCCL when CUDA is available (each process on ``cuda:LOCAL_RANK``), gloo on the CPU. Without that environment
everything here is a no-op for a single process.

Calibration's cross-rank reduction of statistics is in :mod:`trt_qat.calibration.reduce`.

**QAT.** :func:`trt_qat.train.qat.finetune` wraps the model in ``DistributedDataParallel`` when a group is up, calls
``set_epoch`` on a distributed sampler, evaluates on rank 0 and broadcasts the score (so every rank keeps the same
best epoch), and only rank 0 writes checkpoints, reports and ONNX.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch

from trt_qat.errors import LOG, TrtQatError

__all__ = ["init_distributed", "cleanup_distributed", "backend_for", "is_distributed", "get_rank", "get_world_size",
           "is_main_process", "barrier", "distributed_device", "broadcast_object", "all_reduce_mean", "comm_device",
           "torchrun_session"]


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True when a torch.distributed group with more than one process is up."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the process that writes files and prints."""
    return get_rank() == 0


def barrier():
    if is_distributed():
        _dist().barrier()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend (str | None): "nccl" or "gloo". Defaults to NCCL when CUDA is available, else gloo.
        timeout_s (float): collective timeout in seconds. Defaults to 1800.

    Returns:
        tuple[int, int, int]: ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` without torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    dist = _dist()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise TrtQatError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process or "
                          "install a torch with distributed support")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if torch.cuda.device_count() <= local_rank:
            raise TrtQatError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); start "
                              "torchrun with --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrtQatError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; start the processes with "
                          "torchrun (it sets them), e.g. torchrun --nproc_per_node 2 -m trt_qat qat ...")
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    LOG.info("joined %s process group: rank %d of %d (local rank %d)", backend, rank, world, local_rank)
    return rank, world, local_rank


def cleanup_distributed():
    """Leave the process group (if one is up)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def backend_for(device=None) -> str | None:
    """The process-group backend for a ``--device`` value: gloo for an explicit CPU device (NCCL reduces CUDA
    tensors only, and is what :func:`init_distributed` picks whenever CUDA is available), else None (the default)."""
    from trt_qat.config import check_device

    device = check_device(device)
    if device is not None and device.type == "cpu":
        return "gloo"
    return None


def distributed_device(device=None):
    """This rank's device: ``device`` when given, ``cuda:LOCAL_RANK`` under NCCL, else None (keep the model's).

    Under torchrun with more than one process, ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``); an explicit
    index would put every rank on the same GPU and is refused.
    """
    from trt_qat.config import check_device

    device = check_device(device)
    if device is not None:
        if device.type == "cuda" and is_distributed() and get_world_size() > 1:
            if device.index is not None:
                raise TrtQatError(f"--device {device} under torchrun would put every rank on one GPU; pass "
                                  "--device cuda (rank r uses cuda:LOCAL_RANK)")
            return torch.device("cuda", torch.cuda.current_device())
        return device
    if is_distributed() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


@contextlib.contextmanager
def torchrun_session(device=None):
    """A CLI's process group: join torchrun's (when WORLD_SIZE > 1), yield ``(rank, world_size, device)``, and
    leave the group on exit if this call joined it. ``device`` is the ``--device`` value: gloo for an explicit
    CPU, else the default backend; the yielded device is :func:`distributed_device`'s."""
    joined = not (_dist().is_available() and _dist().is_initialized())
    rank, world, _ = init_distributed(backend_for(device))
    joined = joined and world > 1
    try:
        yield rank, world, distributed_device(device)
    finally:
        if joined:
            cleanup_distributed()


def comm_device() -> torch.device:
    """The device collectives run on: this rank's GPU under NCCL, else the CPU."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (the object itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over ranks (``value`` in a single process)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    _dist().all_reduce(t)
    return float(t) / get_world_size()
