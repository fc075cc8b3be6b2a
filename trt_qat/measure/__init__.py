"""trt_qat.measure."""
