"""trt_qat.analysis."""
