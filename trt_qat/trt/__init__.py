"""trt_qat.trt: TensorRT engines from (Q/DQ) ONNX models.

Modules (import them directly; this package imports none of them, so ``tensorrt`` stays unimported):

* :mod:`trt_qat.trt.plan`: what to set on which TensorRT version (pure, no ``tensorrt``).
* :mod:`trt_qat.trt.profile`: shape flags and optimization profiles (``parse_shapes``, ``parse_batch``,
  ``resolve_profile``).
* :mod:`trt_qat.trt.metadata`: the ``<engine>.json`` sidecar (``metadata_path``, ``read_engine_metadata``,
  ``check_engine_metadata``, ``file_sha256``, ``METADATA_FORMAT``).
* :mod:`trt_qat.trt.util`: the environment (``import_tensorrt``, ``TRT_INSTALL_HINT``, ``gpu_info``).
* :mod:`trt_qat.trt.build`: ``build_engine`` and its CPU-side pre-checks.
"""
