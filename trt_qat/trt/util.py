"""The TensorRT and GPU environment: importing ``tensorrt`` lazily, and probing the CUDA device.

Nothing here imports ``tensorrt``, ``pycuda`` or ``torch`` at module import; each is tried only when a
function is called, so the CPU-side checks work on a machine without them.
"""
from __future__ import annotations

import shutil
import subprocess

from trt_qat.errors import TrtQatError

__all__ = ["import_tensorrt", "gpu_info", "TRT_INSTALL_HINT"]

TRT_INSTALL_HINT = ("TensorRT is not installed: use the Docker image (docker/README.md) or install it from NVIDIA's "
                    "index (pip install tensorrt --extra-index-url https://pypi.nvidia.com)")


def import_tensorrt():
    """Import ``tensorrt`` or raise a TrtQatError saying how to get it.

    Returns:
        module: the ``tensorrt`` module.

    Raises:
        TrtQatError: ``tensorrt`` is not installed (the message is :data:`TRT_INSTALL_HINT`).
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise TrtQatError(TRT_INSTALL_HINT) from None
    return trt


def gpu_info(device: int = 0) -> dict:
    """Name and compute capability of a CUDA device, from pycuda, cuda-python, torch or nvidia-smi (the first
    that works).

    Args:
        device (int): the CUDA device index. Defaults to 0.

    Returns:
        dict: ``{"name": str, "compute_capability": "8.7"}``; name "unknown" and capability None when no probe
        works (no GPU visible).
    """
    try:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(device)
        major, minor = dev.compute_capability()
        return {"name": dev.name(), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    try:
        from cuda import cudart  # cuda-python

        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return {"name": name.strip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader",
                                  f"--id={device}"], capture_output=True, text=True, timeout=20, check=True)
            name, cc = [s.strip() for s in out.stdout.strip().splitlines()[0].split(",")[:2]]
            return {"name": name, "compute_capability": cc}
        except Exception:
            pass
    return {"name": "unknown", "compute_capability": None}
