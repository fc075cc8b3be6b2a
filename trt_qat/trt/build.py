"""Build a TensorRT engine from a (Q/DQ) ONNX: ``python -m trt_qat.build_engine`` / ``trt-qat build``.

Uses the TensorRT Python API directly (not Polygraphy's ``CreateConfig``, which still sets precision flags and
fails on TensorRT 11). What to set on which version is decided by the pure :func:`trt_qat.trt_versions.plan_build`.

Everything that can be checked without TensorRT is checked first, on CPU: the ONNX loads, its Q/DQ nodes and
opset fit the precision, the shape flags parse and fit the ONNX's inputs. Only then is ``tensorrt`` imported.

Each engine gets a ``<engine>.json`` metadata file beside it (ONNX sha256, TensorRT version, GPU name and
compute capability, flags, profile, build time); :class:`trt_qat.runners.trt.TrtRunner` refuses an engine whose
metadata does not match the running TensorRT or GPU. Both files are written atomically.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_write_bytes, atomic_write_json
from trt_qat.onnx.io import has_qdq, load_onnx, onnx_inputs, onnx_opset
from trt_qat.trt.plan import check_precision, default_engine_name, parse_trt_version, plan_build

__all__ = ["build_engine", "parse_shapes",
           "parse_batch", "resolve_profile", "check_engine_metadata", "read_engine_metadata", "metadata_path",
           "import_tensorrt", "gpu_info", "file_sha256", "TRT_INSTALL_HINT", "METADATA_FORMAT"]

TRT_INSTALL_HINT = ("TensorRT is not installed: use the Docker image (docker/README.md) or install it from NVIDIA's "
                    "index (pip install tensorrt --extra-index-url https://pypi.nvidia.com)")
METADATA_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# CPU-side checks (no tensorrt)
# ----------------------------------------------------------------------------------------------------------
def parse_shapes(text) -> dict:
    """Parse a trtexec shapes flag: ``"images:1x3x640x640,mask:1x1"`` -> ``{"images": (1, 3, 640, 640), ...}``.

    Input names may be quoted (``'images':1x3x8x8``) and may contain ``:`` (the last ``:`` splits).

    Args:
        text (str | None): the flag value.

    Returns:
        dict[str, tuple[int, ...]]: the shapes ({} for None or "").
    """
    if text is None or not str(text).strip():
        return {}
    shapes = {}
    for item in str(text).split(","):
        item = item.strip()
        name, sep, dims = item.rpartition(":")
        name = name.strip().strip("'\"")
        if not sep or not name or not dims:
            raise TrtQatError(f"cannot read the shape '{item}'; write NAME:DxDxD..., "
                              "e.g. --optShapes images:4x3x640x640")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise TrtQatError(f"cannot read the shape '{item}': dimensions must be integers separated by 'x', "
                              "e.g. images:4x3x640x640") from None
        if any(d <= 0 for d in shape):
            raise TrtQatError(f"shape '{item}' has a dimension <= 0; every dimension must be positive")
        if name in shapes:
            raise TrtQatError(f"input '{name}' appears twice in '{text}'; give each input once")
        shapes[name] = shape
    return shapes


def parse_batch(text) -> tuple:
    """Parse ``--batch``: ``"1:8:16"`` -> (1, 8, 16); ``"8"`` -> (8, 8, 8); ``"1:16"`` -> (1, 16, 16)."""
    parts = str(text).strip().split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise TrtQatError(f"cannot read --batch '{text}'; write MIN:OPT:MAX, e.g. --batch 1:8:16") from None
    if len(values) == 1:
        values = values * 3
    elif len(values) == 2:
        values = [values[0], values[1], values[1]]
    elif len(values) != 3:
        raise TrtQatError(f"cannot read --batch '{text}'; write MIN:OPT:MAX, e.g. --batch 1:8:16")
    if values[0] < 1 or not values[0] <= values[1] <= values[2]:
        raise TrtQatError(f"--batch '{text}' must satisfy 1 <= MIN <= OPT <= MAX")
    return tuple(values)


def resolve_profile(inputs: dict, min_shapes=None, opt_shapes=None, max_shapes=None, batch=None) -> dict:
    """Build the optimization profile ``{name: (min, opt, max)}`` from the flags and the ONNX's inputs.

    Args:
        inputs (dict): ``{name: [dim or None]}`` from :func:`onnx_inputs`.
        min_shapes, opt_shapes, max_shapes (str | dict | None): trtexec-style shapes (see :func:`parse_shapes`).
            A missing one of min/max defaults to opt.
        batch (str | tuple | None): ``MIN:OPT:MAX`` for dimension 0 of every input (other dims from the ONNX).

    Returns:
        dict[str, tuple[tuple, tuple, tuple]]: the profile; {} when every input is static and no flag is given.
    """
    mins, opts, maxs = (s if isinstance(s, dict) else parse_shapes(s) for s in (min_shapes, opt_shapes, max_shapes))
    if batch is not None and (mins or opts or maxs):
        raise TrtQatError("give either --batch or --minShapes/--optShapes/--maxShapes, not both")
    profile = {}
    if batch is not None:
        b = parse_batch(batch) if not isinstance(batch, (tuple, list)) else tuple(batch)
        for name, dims in inputs.items():
            if not dims:
                raise TrtQatError(f"input '{name}' has no known rank, so --batch cannot apply; use --minShapes/"
                                  "--optShapes/--maxShapes")
            rest = dims[1:]
            if any(d is None for d in rest):
                raise TrtQatError(f"input '{name}' has dynamic non-batch dimensions {dims}; give them with "
                                  "--minShapes/--optShapes/--maxShapes instead of --batch")
            if dims[0] is not None and not b[0] == b[2] == dims[0]:
                raise TrtQatError(f"input '{name}' has a fixed batch of {dims[0]}; re-export the ONNX with a "
                                  "dynamic batch (`trt-qat export --dynamic-batch`) to use --batch")
            profile[name] = tuple(tuple([v] + list(rest)) for v in b)
        return profile

    given = set(mins) | set(opts) | set(maxs)
    unknown = sorted(given - set(inputs))
    if unknown:
        raise TrtQatError(f"shape flags name unknown inputs {unknown}; the ONNX's inputs are {sorted(inputs)}")
    for name, dims in inputs.items():
        dynamic = any(d is None for d in dims)
        if name not in given:
            if dynamic:
                if dims and dims[0] is None and all(d is not None for d in dims[1:]):
                    LOG.warning("input '%s' has a dynamic batch and no profile was given; building for batch 1 "
                                "(use --batch MIN:OPT:MAX for a range)", name)
                    shape = tuple([1] + dims[1:])
                    profile[name] = (shape, shape, shape)
                else:
                    raise TrtQatError(f"input '{name}' has dynamic dimensions {dims}; give its shapes with "
                                      "--minShapes/--optShapes/--maxShapes")
            continue
        opt = opts.get(name) or maxs.get(name) or mins.get(name)
        mn, mx = mins.get(name, opt), maxs.get(name, opt)
        for label, shape in (("min", mn), ("opt", opt), ("max", mx)):
            if len(shape) != len(dims):
                raise TrtQatError(f"--{label}Shapes for '{name}' has rank {len(shape)} but the input has rank "
                                  f"{len(dims)} ({dims})")
            for i, (s, d) in enumerate(zip(shape, dims)):
                if d is not None and s != d:
                    raise TrtQatError(f"--{label}Shapes for '{name}' sets dimension {i} to {s} but the ONNX fixes "
                                      f"it at {d}")
        if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
            raise TrtQatError(f"shapes for '{name}' must satisfy min <= opt <= max in every dimension "
                              f"(got {mn}, {opt}, {mx})")
        profile[name] = (tuple(mn), tuple(opt), tuple(mx))
    return profile


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# TensorRT / GPU environment
# ----------------------------------------------------------------------------------------------------------
def import_tensorrt():
    """Import ``tensorrt`` or raise a TrtQatError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TrtQatError(TRT_INSTALL_HINT) from None
    return trt


def gpu_info(device: int = 0) -> dict:
    """``{"name": str, "compute_capability": "8.7"}`` of a CUDA device, from pycuda, cuda-python, torch or
    nvidia-smi (the first that works); name "unknown" and capability None when none does."""
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


# ----------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------
def metadata_path(engine_path) -> Path:
    """``<engine>.json`` beside the engine."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_engine_metadata(engine_path) -> dict | None:
    """The engine's metadata dict, or None if it has no ``<engine>.json``."""
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
        meta (dict | None): the engine's metadata (see :func:`build_engine`); None means none was found.
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


# ----------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------
def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class _Validated:
    """The CPU-side facts about one build request."""

    def __init__(self, onnx_path, precision, shapes, min_shapes, opt_shapes, max_shapes, batch):
        self.onnx_path = Path(onnx_path)
        model = load_onnx(self.onnx_path)
        self.has_qdq = has_qdq(model)
        self.precision = check_precision(precision, self.has_qdq)
        self.opset = onnx_opset(model)
        if self.has_qdq and self.opset < 13:
            raise TrtQatError(f"'{self.onnx_path}' has Q/DQ nodes at opset {self.opset}; TensorRT needs opset >= 13 "
                              "for per-channel Q/DQ (axis): re-export with `trt-qat export --opset 13`")
        self.inputs = onnx_inputs(model)
        if shapes:
            if any(x is not None for x in (min_shapes, opt_shapes, max_shapes, batch)):
                raise TrtQatError("give either shapes= or the --minShapes/--optShapes/--maxShapes/--batch flags")
            shapes = {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in shapes.items()}
            mins = {k: v[0] for k, v in shapes.items()}
            opts = {k: v[1] for k, v in shapes.items()}
            maxs = {k: v[2] for k, v in shapes.items()}
            self.profile = resolve_profile(self.inputs, mins, opts, maxs)
        else:
            self.profile = resolve_profile(self.inputs, min_shapes, opt_shapes, max_shapes, batch)


def build_engine(onnx_path, engine_path=None, precision: str = "int8", fp16_fallback: bool = True, shapes=None,
                 workspace_mib: int | None = None, timing_cache: str | None = "engines/timing.cache",
                 builder_optimization_level: int | None = None, dla_core: int | None = None,
                 allow_gpu_fallback: bool = False, strongly_typed: bool | None = None, verbose: bool = False,
                 *, min_shapes=None, opt_shapes=None, max_shapes=None, batch=None) -> Path:
    """Build and save a TensorRT engine (and its ``<engine>.json`` metadata).

    Args:
        onnx_path (str | Path): the ONNX (with Q/DQ for int8).
        engine_path (str | Path | None): where to write the engine. Defaults to
            ``engines/<model>_<precision>_trt<ver>_<gpu>.engine``.
        precision (str): "fp32", "fp16" or "int8". Defaults to "int8".
        fp16_fallback (bool): for int8, run layers Q/DQ leaves unquantized in FP16. Defaults to True.
        shapes (dict | None): ``{input: (min, opt, max)}`` optimization profile. Defaults to None (static
            inputs; a dynamic batch alone builds for batch 1).
        workspace_mib (int | None): workspace memory pool limit in MiB. Defaults to TensorRT's.
        timing_cache (str | None): timing cache file, loaded if present and saved after the build.
            Defaults to "engines/timing.cache"; None or "" disables it.
        builder_optimization_level (int | None): 0-5. Defaults to TensorRT's (3).
        dla_core (int | None): build for this DLA core. Defaults to None (GPU).
        allow_gpu_fallback (bool): with DLA, let unsupported layers run on the GPU. Defaults to False.
        strongly_typed (bool | None): see :func:`trt_qat.trt_versions.plan_build`. Defaults to None (per version).
        verbose (bool): TensorRT's verbose log. Defaults to False.
        min_shapes, opt_shapes, max_shapes (str | None): trtexec-style shape flags instead of ``shapes``.
        batch (str | tuple | None): ``MIN:OPT:MAX`` batch range instead of ``shapes``.

    Returns:
        Path: the engine file.
    """
    if workspace_mib is not None and int(workspace_mib) <= 0:
        raise TrtQatError(f"--workspace must be a positive number of MiB, got {workspace_mib}")
    if builder_optimization_level is not None and not 0 <= int(builder_optimization_level) <= 5:
        raise TrtQatError(f"--builderOptimizationLevel must be 0..5, got {builder_optimization_level}")
    v = _Validated(onnx_path, precision, shapes, min_shapes, opt_shapes, max_shapes, batch)

    trt = import_tensorrt()
    plan = plan_build(trt.__version__, v.precision, v.has_qdq, strongly_typed=strongly_typed,
                      fp16_fallback=fp16_fallback, dla_core=dla_core, allow_gpu_fallback=allow_gpu_fallback)
    for note in plan.notes:
        LOG.info("%s", note)
    gpu = gpu_info()
    engine_path = Path(engine_path) if engine_path else Path("engines") / default_engine_name(
        v.onnx_path.name, v.precision, trt.__version__, gpu["name"])

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    if dla_core is not None and int(dla_core) >= builder.num_DLA_cores:
        raise TrtQatError(f"DLA core {dla_core} requested but this device has {builder.num_DLA_cores} DLA cores; "
                          "choose --useDLACore 0.." + str(max(builder.num_DLA_cores - 1, 0)) + " or drop it")
    net_flags = 0
    for name in plan.network_flags:
        net_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trt_qat_build_") as tmpdir:
        parse_path = v.onnx_path
        if plan.convert_onnx_to_fp16:
            from trt_qat.onnx.fp16 import convert_to_fp16

            parse_path = convert_to_fp16(v.onnx_path, Path(tmpdir) / (v.onnx_path.stem + "_fp16.onnx"))
        if not parser.parse_from_file(str(parse_path)):
            errors = [_one_line(parser.get_error(i)) for i in range(parser.num_errors)]
            raise TrtQatError(f"TensorRT {trt.__version__} cannot parse '{v.onnx_path}': "
                              f"{'; '.join(errors[:3]) or 'unknown parser error'}"
                              f"{f' (+{len(errors) - 3} more)' if len(errors) > 3 else ''}; "
                              "check the ONNX with `trt-qat lint` or re-export it")

    config = builder.create_builder_config()
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if builder_optimization_level is not None:
        config.builder_optimization_level = int(builder_optimization_level)
    if v.profile:
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in v.profile.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, False):  # ignore_mismatch=False
            LOG.warning("timing cache '%s' does not match this TensorRT/GPU; starting a new one", cache_path)
            config.set_timing_cache(config.create_timing_cache(b""), False)

    LOG.info("building %s engine from %s with TensorRT %s (%s%s)", v.precision, v.onnx_path, trt.__version__,
             "strongly typed" if plan.strongly_typed else "flags " + ",".join(plan.builder_flags or ["none"]),
             ", DLA core %d" % plan.dla_core if plan.dla_core is not None else "")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtQatError(f"TensorRT {trt.__version__} failed to build an engine from '{v.onnx_path}'; rerun with "
                          "--verbose to see the failing layer (often: unsupported op, --workspace too small, or a "
                          "DLA layer without --allowGPUFallback)")
    build_seconds = time.perf_counter() - start
    engine_bytes = bytes(memoryview(serialized))
    atomic_write_bytes(engine_path, engine_bytes)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    meta = {
        "format": METADATA_FORMAT,
        "engine": engine_path.name,
        "engine_bytes": len(engine_bytes),
        "onnx": str(v.onnx_path),
        "onnx_sha256": file_sha256(v.onnx_path),
        "trt_version": trt.__version__,
        "gpu_name": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "precision": v.precision,
        "has_qdq": v.has_qdq,
        "opset": v.opset,
        "fp16_fallback": bool(fp16_fallback),
        "builder_flags": plan.builder_flags,
        "network_flags": plan.network_flags,
        "strongly_typed": plan.strongly_typed,
        "onnx_converted_to_fp16": plan.convert_onnx_to_fp16,
        "exec_api": plan.exec_api,
        "profile": {k: [list(s) for s in val] for k, val in v.profile.items()},
        "workspace_mib": workspace_mib,
        "builder_optimization_level": builder_optimization_level,
        "dla_core": plan.dla_core,
        "allow_gpu_fallback": bool(allow_gpu_fallback),
        "build_seconds": round(build_seconds, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "plan": plan.to_dict(),
    }
    atomic_write_json(metadata_path(engine_path), meta)
    LOG.info("wrote %s (%.1f MiB) in %.1f s", engine_path, len(engine_bytes) / 2**20, build_seconds)
    return engine_path


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
