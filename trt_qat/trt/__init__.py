"""trt_qat.trt."""
