"""Build a TensorRT engine from a (Q/DQ) ONNX: ``python -m trt_qat.build_engine`` / ``trt-qat build``.

Uses the TensorRT Python API directly (not Polygraphy's ``CreateConfig``, which still sets precision flags and
fails on TensorRT 11). What to set on which version is decided by the pure :func:`trt_qat.trt.plan.plan_build`.

Everything that can be checked without TensorRT is checked first, on CPU: the ONNX loads, its Q/DQ nodes and
opset fit the precision, the shape flags parse and fit the ONNX's inputs (:mod:`trt_qat.trt.profile`). Only then
is ``tensorrt`` imported (:func:`trt_qat.trt.util.import_tensorrt`).

Each engine gets a ``<engine>.json`` metadata file beside it (ONNX sha256, TensorRT version, GPU name and
compute capability, flags, profile, build time; see :mod:`trt_qat.trt.metadata`);
:class:`trt_qat.runners.trt.TrtRunner` refuses an engine whose metadata does not match the running TensorRT or
GPU. Both files are written atomically.
"""
from __future__ import annotations

import datetime
import tempfile
import time
from pathlib import Path

from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_write_bytes, atomic_write_json
from trt_qat.onnx.io import has_qdq, load_onnx, onnx_inputs, onnx_opset
from trt_qat.trt.metadata import METADATA_FORMAT, file_sha256, metadata_path
from trt_qat.trt.plan import SPARSITY_MODES, check_precision, default_engine_name, plan_build
from trt_qat.trt.profile import resolve_profile
from trt_qat.trt.util import gpu_info, import_tensorrt

__all__ = ["build_engine", "count_2_4_convs", "force_2_4_onnx"]


def _one_line(text: str, limit: int = 400) -> str:
    """``text`` with its whitespace collapsed to single spaces, cut at ``limit`` characters (for parser errors)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class _Validated:
    """The CPU-side facts about one build request."""

    def __init__(self, onnx_path, precision, shapes, min_shapes, opt_shapes, max_shapes, batch, sparsity="disable"):
        self.onnx_path = Path(onnx_path)
        model = load_onnx(self.onnx_path)
        self.has_qdq = has_qdq(model)
        self.precision = check_precision(precision, self.has_qdq)
        self.sparsity = str(sparsity).lower()
        if self.sparsity not in SPARSITY_MODES:
            raise TrtQatError(f"unknown --sparsity '{sparsity}'; use one of {', '.join(SPARSITY_MODES)}")
        if self.sparsity == "enable":
            sparse, convs = count_2_4_convs(model)
            if not sparse:
                LOG.warning("--sparsity enable, but none of the %d convs of '%s' holds 2:4 weights: TensorRT will "
                            "pick no sparse kernel; run `trt-qat sparsify` (then QAT and export) first, or use "
                            "--sparsity force to measure the speed ceiling", convs, self.onnx_path)
            else:
                LOG.info("%d of %d convs hold 2:4 weights", sparse, convs)
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
                 *, min_shapes=None, opt_shapes=None, max_shapes=None, batch=None, sparsity: str = "disable") -> Path:
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
        strongly_typed (bool | None): see :func:`trt_qat.trt.plan.plan_build`. Defaults to None (per version).
        verbose (bool): TensorRT's verbose log. Defaults to False.
        min_shapes, opt_shapes, max_shapes (str | None): trtexec-style shape flags instead of ``shapes``.
        batch (str | tuple | None): ``MIN:OPT:MAX`` batch range instead of ``shapes``.
        sparsity (str): "disable", "enable" (``BuilderFlag.SPARSE_WEIGHTS``; a warning when no conv holds 2:4) or
            "force" (weights rewritten to 2:4 first: speed ceiling only). Defaults to "disable".

    Returns:
        Path: the engine file.

    Raises:
        TrtQatError: a CPU-side check fails (ONNX, Q/DQ, opset, precision, shape flags), TensorRT is missing,
            or TensorRT cannot parse the ONNX or build the engine.
    """
    if workspace_mib is not None and int(workspace_mib) <= 0:
        raise TrtQatError(f"--workspace must be a positive number of MiB, got {workspace_mib}")
    if builder_optimization_level is not None and not 0 <= int(builder_optimization_level) <= 5:
        raise TrtQatError(f"--builderOptimizationLevel must be 0..5, got {builder_optimization_level}")
    v = _Validated(onnx_path, precision, shapes, min_shapes, opt_shapes, max_shapes, batch, sparsity)

    trt = import_tensorrt()
    plan = plan_build(trt.__version__, v.precision, v.has_qdq, strongly_typed=strongly_typed,
                      fp16_fallback=fp16_fallback, dla_core=dla_core, allow_gpu_fallback=allow_gpu_fallback,
                      sparsity=v.sparsity)
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
        if plan.force_2_4_weights:
            parse_path = force_2_4_onnx(v.onnx_path, Path(tmpdir) / (v.onnx_path.stem + "_2of4.onnx"))
        if plan.convert_onnx_to_fp16:
            from trt_qat.onnx.fp16 import convert_to_fp16

            parse_path = convert_to_fp16(parse_path, Path(tmpdir) / (v.onnx_path.stem + "_fp16.onnx"))
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


def count_2_4_convs(model) -> tuple:
    """``(convs whose weights hold 2:4 as TensorRT sees them, all convs)`` of ONNX ``model`` (a ModelProto)."""
    from trt_qat.onnx.lint.checks_sparsity import conv_weight_values, weights_hold_2_4
    from trt_qat.onnx.lint.graph import LintGraph

    g = LintGraph(model)
    convs = [n for n in g.nodes if n.op == "Conv" and len(n.inputs) > 1 and int(g.attr(n, "group", 1)) == 1]
    sparse = sum(1 for n in convs if (w := conv_weight_values(g, n)) is not None and weights_hold_2_4(w))
    return sparse, len(convs)


def force_2_4_onnx(src, dst) -> Path:
    """Write ``src`` to ``dst`` with the float weight constant of every Conv (groups 1, input channels a multiple of
    4; directly or behind QuantizeLinear) zeroed to the magnitude 2:4 pattern, as trtexec's ``--sparsity=force``
    does. Only for measuring the speed ceiling: the accuracy is lost."""
    import numpy as np
    from onnx import numpy_helper

    model = load_onnx(Path(src))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    forced = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        if any(a.name == "group" and a.i != 1 for a in node.attribute):
            continue
        name = node.input[1]
        for _ in range(3):  # Conv <- DQ <- Q <- float weight
            if name in inits:
                break
            prod = producers.get(name)
            name = prod.input[0] if prod is not None and prod.op_type in ("DequantizeLinear", "QuantizeLinear") else ""
        w = numpy_helper.to_array(inits[name]) if name in inits else None
        if w is None or w.dtype.kind != "f" or w.ndim < 2 or w.shape[1] % 4:
            continue
        moved = np.moveaxis(w, 1, -1)
        groups = moved.reshape(*moved.shape[:-1], w.shape[1] // 4, 4)
        order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
        mask = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(mask, order[..., :2], True, axis=-1)
        sparse = np.moveaxis((groups * mask).reshape(moved.shape), -1, 1).astype(w.dtype)
        inits[name].CopyFrom(numpy_helper.from_array(sparse, name))
        forced += 1
    LOG.warning("--sparsity force: %d conv weights rewritten to 2:4; the engine's accuracy is lost", forced)
    import onnx

    onnx.save(model, str(dst))
    return Path(dst)
