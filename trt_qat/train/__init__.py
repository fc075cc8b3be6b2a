"""trt_qat.train."""
