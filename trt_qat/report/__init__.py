"""trt_qat.report."""
