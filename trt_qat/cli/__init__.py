"""trt_qat.cli."""
