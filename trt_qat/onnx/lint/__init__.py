"""trt_qat.onnx.lint."""
