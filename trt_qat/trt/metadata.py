"""Engine metadata: the ``<engine>.json`` sidecar written beside each engine, and the check that an engine fits
the running TensorRT and GPU.

The sidecar records the ONNX's sha256 (:func:`file_sha256`), the TensorRT version, the GPU name and compute
capability, the build flags, the profile and the build time (:func:`trt_qat.trt.build.build_engine` writes it);
:class:`trt_qat.runners.trt.TrtRunner` reads it (:func:`read_engine_metadata`) and refuses an engine whose
metadata does not match (:func:`check_engine_metadata`). Pure file and dict work: no ``tensorrt`` import.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trt_qat.errors import TrtQatError
from trt_qat.trt.plan import parse_trt_version

__all__ = ["metadata_path", "read_engine_metadata", "check_engine_metadata", "file_sha256", "METADATA_FORMAT"]

METADATA_FORMAT = 1


def file_sha256(path) -> str:
    """The sha256 of a file, read in 1 MiB chunks.

    Args:
        path (str | Path): the file.

    Returns:
        str: the hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def metadata_path(engine_path) -> Path:
    """``<engine>.json`` beside the engine.

    Args:
        engine_path (str | Path): the engine file.

    Returns:
        Path: its metadata file.
    """
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_engine_metadata(engine_path) -> dict | None:
    """The engine's metadata dict, or None if it has no ``<engine>.json``.

    Args:
        engine_path (str | Path): the engine file.

    Returns:
        dict | None: the metadata.

    Raises:
        TrtQatError: the metadata file exists but cannot be read or is not JSON.
    """
    path = metadata_path(engine_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrtQatError(f"engine metadata '{path}' cannot be read ({exc}); delete it and rebuild the engine "
                          "with `python -m trt_qat.build_engine`") from None


def check_engine_metadata(meta: dict | None, trt_version, gpu_name: str | None, cc) -> list:
    """Check an engine's metadata against the running TensorRT and GPU (pure function).

    Args:
        meta (dict | None): the engine's metadata (see :func:`trt_qat.trt.build.build_engine`); None means none
            was found.
        trt_version (str | tuple): the running TensorRT version.
        gpu_name (str | None): the running GPU's name.
        cc (str | tuple | None): its compute capability ("8.7" or (8, 7)); None if unknown.

    Returns:
        list[str]: warnings (e.g. same architecture, different GPU model).

    Raises:
        TrtQatError: built with another TensorRT version, or for another compute capability.
    """
    if meta is None:
        return ["the engine has no metadata (.json beside it), so its TensorRT version and GPU cannot be checked"]
    warnings = []
    engine = meta.get("engine", "the engine")
    rebuild = ("rebuild it on this machine: python -m trt_qat.build_engine --onnx "
               f"{meta.get('onnx', '<model.onnx>')} --precision {meta.get('precision', 'int8')}")
    built = meta.get("trt_version")
    if built is None:
        warnings.append("the engine metadata does not record a TensorRT version")
    elif parse_trt_version(built) != parse_trt_version(trt_version):
        raise TrtQatError(f"engine '{engine}' was built with TensorRT {built} but this is TensorRT {trt_version}; "
                          f"engines only load on the TensorRT version that built them: {rebuild}")
    built_cc = meta.get("compute_capability")
    if isinstance(cc, (tuple, list)):
        cc = ".".join(str(c) for c in cc)
    if built_cc and cc and str(built_cc) != str(cc):
        raise TrtQatError(f"engine '{engine}' was built for a GPU of compute capability {built_cc} "
                          f"({meta.get('gpu_name', '?')}) but this GPU ({gpu_name}) is {cc}; {rebuild}")
    built_gpu = meta.get("gpu_name")
    if built_gpu and gpu_name and built_gpu != gpu_name and built_gpu != "unknown" and gpu_name != "unknown":
        warnings.append(f"engine built on '{built_gpu}', running on '{gpu_name}' (same compute capability {cc}); "
                        "latency may differ from a native build")
    return warnings
