"""trt_qat.onnx."""
