"""Which TensorRT build recipe fits which TensorRT version: pure functions, no ``tensorrt`` import.

The facts (REFERENCES.md section 3):

* **8.6** (JetPack 5): weakly typed; ``BuilderFlag.INT8`` (+ ``FP16`` for the layers Q/DQ leaves in float);
  ONNX networks need ``EXPLICIT_BATCH``; inference through ``execute_async_v2`` with bindings.
* **10.x** (JetPack 6 ships 10.3): ``create_network(0)``; either weakly typed with ``INT8``/``FP16`` flags, or a
  ``STRONGLY_TYPED`` network where precision follows the graph's types and no precision flag may be set;
  precision flags are deprecated from 10.12; inference through ``execute_async_v3``.
* **11.x**: always strongly typed, the precision flags are gone; INT8 only through Q/DQ; FP16 for the
  unquantized layers means the ONNX itself is converted to FP16 first (see :mod:`trt_qat.onnx_fp16`).

Defaults chosen here (``strongly_typed=None``): weakly typed on 8.6 and on 10.0-10.11 (the well-trodden
JetPack path), strongly typed from 10.12 (where the flags are deprecated) and always on 11.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from trt_qat.errors import TrtQatError

__all__ = ["BuildPlan", "parse_trt_version", "plan_build", "check_precision", "default_engine_name", "sanitize_name",
           "PRECISIONS", "SPARSITY_MODES"]

PRECISIONS = ("fp32", "fp16", "int8")
#: trtexec's --sparsity values: no sparse kernels; sparse kernels where the weights hold 2:4
#: (``BuilderFlag.SPARSE_WEIGHTS``); or the weights forced to 2:4 first (speed ceiling only: accuracy is lost)
SPARSITY_MODES = ("disable", "enable", "force")

#: first 10.x minor release in which the precision BuilderFlags are deprecated
_FLAGS_DEPRECATED = (10, 12, 0)
#: first 11.x release with DLA support again (AGX Orin, JetPack 7.2.2+)
_DLA_BACK_IN_11 = (11, 4, 1)


@dataclass(frozen=True)
class BuildPlan:
    """How to build an engine on one TensorRT version.

    Attributes:
        trt_version (tuple[int, int, int]): the TensorRT version planned for.
        precision (str): "fp32", "fp16" or "int8".
        builder_flags (list[str]): ``trt.BuilderFlag`` member names to set ("INT8", "FP16", "GPU_FALLBACK").
        strongly_typed (bool): build a strongly typed network.
        network_flags (list[str]): ``trt.NetworkDefinitionCreationFlag`` member names ("EXPLICIT_BATCH",
            "STRONGLY_TYPED").
        convert_onnx_to_fp16 (bool): convert the ONNX's float tensors to FP16 (keeping Q/DQ and I/O types)
            before parsing, because a strongly typed network takes its precision from the graph.
        exec_api (str): "v2" (``execute_async_v2`` + bindings) or "v3" (``execute_async_v3`` + tensor addresses).
        dla_core (int | None): DLA core, or None for the GPU.
        notes (list[str]): human-readable remarks on the choices made.
        sparsity (str): "disable", "enable" or "force" (see :data:`SPARSITY_MODES`).
        force_2_4_weights (bool): rewrite the ONNX's conv weights to 2:4 (magnitude) before parsing ("force").
    """

    trt_version: tuple
    precision: str
    builder_flags: list = field(default_factory=list)
    strongly_typed: bool = False
    network_flags: list = field(default_factory=list)
    convert_onnx_to_fp16: bool = False
    exec_api: str = "v3"
    dla_core: int | None = None
    notes: list = field(default_factory=list)
    sparsity: str = "disable"
    force_2_4_weights: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trt_version"] = ".".join(str(v) for v in self.trt_version)
        return d


def parse_trt_version(version) -> tuple:
    """``"10.3.0.26"`` -> ``(10, 3, 0)``. Accepts a string (``trt.__version__``) or a tuple of ints.

    Args:
        version (str | tuple | list): the version. Missing minor/patch parts count as 0.

    Returns:
        tuple[int, int, int]: major, minor, patch.
    """
    if isinstance(version, (tuple, list)):
        parts = [int(p) for p in version[:3]]
    else:
        m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
        if not m:
            raise TrtQatError(f"cannot read the TensorRT version '{version}'; expected e.g. '10.3.0.26'")
        parts = [int(p) for p in m.groups() if p is not None]
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def _fmt(version: tuple) -> str:
    return ".".join(str(v) for v in version)


def check_precision(precision: str, has_qdq: bool) -> str:
    """Check that ``precision`` fits the ONNX (Q/DQ or not); return it lower-cased. Version-independent."""
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise TrtQatError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not has_qdq:
        raise TrtQatError("precision int8 needs an ONNX with Q/DQ (QuantizeLinear/DequantizeLinear) nodes and this "
                          "one has none; run `trt-qat calibrate` (PTQ) or `trt-qat qat` first and export with "
                          "`trt-qat export`, or build with --precision fp16")
    if precision != "int8" and has_qdq:
        raise TrtQatError(f"the ONNX has Q/DQ nodes, so its quantized layers run in INT8 whatever --precision says; "
                          f"build it with --precision int8, or export the model without quantizers for {precision}")
    return precision


def plan_build(trt_version, precision: str, has_qdq: bool, strongly_typed: bool | None = None,
               fp16_fallback: bool = True, dla_core: int | None = None,
               allow_gpu_fallback: bool = False, sparsity: str = "disable") -> BuildPlan:
    """Choose network flags, builder flags and ONNX preparation for one build.

    Args:
        trt_version (str | tuple): the TensorRT version that will build (``trt.__version__``).
        precision (str): "fp32", "fp16" or "int8".
        has_qdq (bool): whether the ONNX contains QuantizeLinear/DequantizeLinear nodes.
        strongly_typed (bool | None): force (True) or forbid (False) a strongly typed network.
            Defaults to None: weakly typed on 8.6 and 10.0-10.11, strongly typed from 10.12 and on 11.
        fp16_fallback (bool): for int8, run the layers Q/DQ leaves unquantized in FP16. Defaults to True.
        dla_core (int | None): build for this DLA core (Jetson). Defaults to None (GPU).
        allow_gpu_fallback (bool): let layers DLA cannot run fall back to the GPU. Defaults to False.
        sparsity (str): "disable" (dense kernels only), "enable" (``BuilderFlag.SPARSE_WEIGHTS``: sparse tensor-core
            kernels where the weights hold 2:4 and are faster) or "force" (the conv weights are first rewritten to
            2:4, as trtexec's ``--sparsity=force`` does: for measuring the speed ceiling, the accuracy is lost).
            The flag is an optimization flag, not a precision flag, so it is set on every supported version, strongly
            typed networks included. Defaults to "disable".

    Returns:
        BuildPlan: the plan.

    Raises:
        TrtQatError: for combinations TensorRT would reject, with the fix.
    """
    ver = parse_trt_version(trt_version)
    vstr = _fmt(ver)
    major = ver[0]
    notes: list[str] = []
    if ver < (8, 6, 0):
        raise TrtQatError(f"TensorRT {vstr} is not supported; use TensorRT 8.6 (JetPack 5), 10.x (JetPack 6) "
                          "or 11.x, e.g. through the Docker images in docker/README.md")
    if major == 9:
        raise TrtQatError(f"TensorRT {vstr} (9.x, an LLM-only release line) is not supported; "
                          "use TensorRT 10.x or 11.x")
    if major > 11:
        notes.append(f"TensorRT {vstr} is newer than 11.x; planned with the TensorRT 11 rules")
    precision = check_precision(precision, has_qdq)

    # --- typing mode ---------------------------------------------------------------------------------------
    if major == 8:
        if strongly_typed:
            raise TrtQatError(f"strongly typed networks are not supported by TensorRT {vstr}; "
                              "drop --stronglyTyped (needs TensorRT >= 10)")
        typed = False
    elif major >= 11:
        if strongly_typed is False:
            raise TrtQatError(f"TensorRT {vstr} builds only strongly typed networks (its precision flags were "
                              "removed); drop the weakly typed request")
        typed = True
        notes.append(f"TensorRT {vstr}: always strongly typed, no precision flags")
    else:  # 10.x
        if strongly_typed is None:
            typed = ver >= _FLAGS_DEPRECATED
            if typed:
                notes.append(f"TensorRT {vstr}: precision BuilderFlags are deprecated from 10.12, "
                             "so the network is strongly typed")
        else:
            typed = bool(strongly_typed)

    # --- flags ---------------------------------------------------------------------------------------------
    builder_flags: list[str] = []
    convert = False
    if typed:
        convert = precision == "fp16" or (precision == "int8" and fp16_fallback)
        if convert:
            notes.append("float layers run in FP16 because the ONNX is converted to FP16 first "
                         "(Q/DQ scales and I/O types kept)")
        elif precision == "int8":
            notes.append("unquantized layers stay FP32 (--no-fp16)")
    else:
        if precision == "fp16":
            builder_flags.append("FP16")
        elif precision == "int8":
            builder_flags.append("INT8")
            if fp16_fallback:
                builder_flags.append("FP16")
            else:
                notes.append("unquantized layers stay FP32 (--no-fp16)")

    # --- DLA -----------------------------------------------------------------------------------------------
    if dla_core is not None:
        if int(dla_core) < 0:
            raise TrtQatError(f"DLA core must be >= 0, got {dla_core}")
        if precision == "fp32":
            raise TrtQatError("DLA runs only FP16 or INT8 layers; build with --precision fp16 or int8 "
                              "to use --useDLACore")
        if major == 11 and ver < _DLA_BACK_IN_11:
            raise TrtQatError(f"TensorRT {vstr} has no DLA support (it returned in 11.4.1 on AGX Orin with "
                              "JetPack 7.2.2+); drop --useDLACore or use TensorRT 10.x / >= 11.4.1")
        if allow_gpu_fallback:
            builder_flags.append("GPU_FALLBACK")
        else:
            notes.append("DLA without --allowGPUFallback: the build fails if a layer cannot run on DLA")
    elif allow_gpu_fallback:
        notes.append("--allowGPUFallback has no effect without --useDLACore")

    # --- 2:4 sparsity --------------------------------------------------------------------------------------
    sparsity = str(sparsity).lower()
    if sparsity not in SPARSITY_MODES:
        raise TrtQatError(f"unknown --sparsity '{sparsity}'; use one of {', '.join(SPARSITY_MODES)}")
    if sparsity != "disable":
        builder_flags.append("SPARSE_WEIGHTS")
        if precision == "fp32":
            notes.append("sparse tensor-core kernels are FP16/INT8 (TF32 at best): an FP32 build gains little from "
                         "--sparsity")
        if sparsity == "force":
            notes.append("--sparsity force: conv weights are rewritten to 2:4 before the build; the engine's "
                         "accuracy is lost, use it only to measure the speed ceiling")
        if dla_core is not None:
            notes.append("DLA has no sparse kernels: only the layers on the GPU can use 2:4")

    network_flags: list[str] = []
    if major == 8:
        network_flags.append("EXPLICIT_BATCH")
    if typed:
        network_flags.append("STRONGLY_TYPED")

    return BuildPlan(trt_version=ver, precision=precision, builder_flags=builder_flags, strongly_typed=typed,
                     network_flags=network_flags, convert_onnx_to_fp16=convert,
                     exec_api="v2" if major == 8 else "v3",
                     dla_core=None if dla_core is None else int(dla_core), notes=notes, sparsity=sparsity,
                     force_2_4_weights=sparsity == "force")


def sanitize_name(text: str) -> str:
    """Lower-case ``text`` and keep only ``[a-z0-9.-]``, other runs becoming one "-"."""
    out = re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.")
    return out or "unknown"


def default_engine_name(model: str, precision: str, trt_version, gpu_name: str) -> str:
    """``<model>_<precision>_trt<ver>_<gpu>.engine``, e.g. ``yolo_qdq_int8_trt10.3.0_orin.engine``.

    Args:
        model (str): a model name or an ONNX path (its stem is used).
        precision (str): "fp32", "fp16" or "int8".
        trt_version (str | tuple): the TensorRT version.
        gpu_name (str): the GPU's name, e.g. "NVIDIA GeForce RTX 4090" or "Orin".

    Returns:
        str: the file name (no directory).
    """
    stem = str(model).replace("\\", "/").rsplit("/", 1)[-1]
    if stem.lower().endswith(".onnx"):
        stem = stem[:-5]
    model_part = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    gpu = sanitize_name(gpu_name).replace("nvidia-", "").replace("geforce-", "")
    return f"{model_part}_{sanitize_name(precision)}_trt{_fmt(parse_trt_version(trt_version))}_{gpu}.engine"
