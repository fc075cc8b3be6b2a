"""trt_qat.quant."""
