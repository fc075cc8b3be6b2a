"""The version plan: which flags and ONNX preparation each TensorRT version gets (pure, no tensorrt)."""
from __future__ import annotations

import dataclasses

import pytest

from trt_qat.errors import TrtQatError
from trt_qat.trt.plan import BuildPlan, default_engine_name, parse_trt_version, plan_build


def test_parse_trt_version():
    assert parse_trt_version("10.3.0.26") == (10, 3, 0)
    assert parse_trt_version("8.6.2.3") == (8, 6, 2)
    assert parse_trt_version("11.0") == (11, 0, 0)
    assert parse_trt_version("10.12.0.36+cuda12") == (10, 12, 0)
    assert parse_trt_version((10, 3)) == (10, 3, 0)
    with pytest.raises(TrtQatError, match="cannot read the TensorRT version"):
        parse_trt_version("tensorrt")


def test_plan_trt86_jetpack5():
    plan = plan_build("8.6.2.3", "int8", has_qdq=True, strongly_typed=None)
    assert isinstance(plan, BuildPlan)
    assert plan.builder_flags == ["INT8", "FP16"]
    assert plan.network_flags == ["EXPLICIT_BATCH"]
    assert not plan.strongly_typed and not plan.convert_onnx_to_fp16
    assert plan.exec_api == "v2"
    assert plan_build("8.6.1", "int8", True, None, fp16_fallback=False).builder_flags == ["INT8"]
    assert plan_build("8.6.1", "fp16", False, None).builder_flags == ["FP16"]
    assert plan_build("8.6.1", "fp32", False, None).builder_flags == []
    with pytest.raises(TrtQatError, match="not supported by TensorRT 8.6.1"):
        plan_build("8.6.1", "int8", True, strongly_typed=True)


def test_plan_trt103_jetpack6_weak_by_default_strong_on_request():
    plan = plan_build("10.3.0.26", "int8", True, None)
    assert plan.builder_flags == ["INT8", "FP16"]
    assert plan.network_flags == []  # create_network(0): EXPLICIT_BATCH is deprecated on 10.x
    assert not plan.strongly_typed and plan.exec_api == "v3"
    strong = plan_build("10.3.0.26", "int8", True, strongly_typed=True)
    assert strong.builder_flags == [] and strong.network_flags == ["STRONGLY_TYPED"]
    assert strong.strongly_typed and strong.convert_onnx_to_fp16
    assert not plan_build("10.3", "int8", True, True, fp16_fallback=False).convert_onnx_to_fp16


def test_plan_trt10_late_is_strongly_typed_by_default():
    plan = plan_build("10.12.0.36", "int8", True, None)
    assert plan.strongly_typed and plan.builder_flags == [] and plan.convert_onnx_to_fp16
    assert any("deprecated" in n for n in plan.notes)
    weak = plan_build("10.12.0.36", "int8", True, strongly_typed=False)
    assert weak.builder_flags == ["INT8", "FP16"] and not weak.strongly_typed
    assert plan_build("10.12", "fp16", False, None).convert_onnx_to_fp16
    assert not plan_build("10.12", "fp32", False, None).convert_onnx_to_fp16


def test_plan_trt11_always_strongly_typed_no_precision_flags():
    for precision, qdq, convert in (("int8", True, True), ("fp16", False, True), ("fp32", False, False)):
        plan = plan_build("11.0.0.1", precision, qdq, None)
        assert plan.strongly_typed and plan.network_flags == ["STRONGLY_TYPED"]
        assert plan.builder_flags == []
        assert plan.convert_onnx_to_fp16 is convert
        assert plan.exec_api == "v3"
    assert not plan_build("11.1", "int8", True, None, fp16_fallback=False).convert_onnx_to_fp16
    with pytest.raises(TrtQatError, match="only strongly typed"):
        plan_build("11.0", "int8", True, strongly_typed=False)


def test_plan_refusals():
    with pytest.raises(TrtQatError, match="run `trt-qat calibrate`"):
        plan_build("10.3", "int8", has_qdq=False, strongly_typed=None)
    with pytest.raises(TrtQatError, match="--precision int8"):
        plan_build("10.3", "fp16", has_qdq=True, strongly_typed=None)
    with pytest.raises(TrtQatError, match="not supported; use TensorRT 8.6"):
        plan_build("8.5.3", "fp16", False, None)
    with pytest.raises(TrtQatError, match="not supported"):
        plan_build("9.2", "fp16", False, None)
    with pytest.raises(TrtQatError, match="unknown precision"):
        plan_build("10.3", "int4", True, None)


def test_plan_dla():
    plan = plan_build("10.3", "int8", True, None, dla_core=0, allow_gpu_fallback=True)
    assert plan.dla_core == 0 and plan.builder_flags == ["INT8", "FP16", "GPU_FALLBACK"]
    assert plan_build("8.6", "fp16", False, None, dla_core=1).builder_flags == ["FP16"]
    with pytest.raises(TrtQatError, match="DLA runs only FP16 or INT8"):
        plan_build("10.3", "fp32", False, None, dla_core=0)
    with pytest.raises(TrtQatError, match="no DLA support"):
        plan_build("11.0", "int8", True, None, dla_core=0)
    assert plan_build("11.4.1", "int8", True, None, dla_core=0).dla_core == 0
    assert any("no effect" in n for n in plan_build("10.3", "fp16", False, None, allow_gpu_fallback=True).notes)


def test_plan_is_frozen_and_serializable():
    plan = plan_build("10.3.0.26", "int8", True, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.precision = "fp16"
    d = plan.to_dict()
    assert d["trt_version"] == "10.3.0" and d["builder_flags"] == ["INT8", "FP16"]


def test_default_engine_name():
    assert default_engine_name("runs/x/yolo_qdq.onnx", "int8", "10.3.0.26", "Orin") == \
        "yolo_qdq_int8_trt10.3.0_orin.engine"
    name = default_engine_name("my model", "fp16", "8.6.2.3", "NVIDIA GeForce RTX 4090")
    assert name == "my-model_fp16_trt8.6.2_rtx-4090.engine"
    assert "/" not in default_engine_name("a/b.onnx", "int8", "11.0", "Jetson AGX/Orin (64GB)")
