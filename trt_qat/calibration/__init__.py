"""trt_qat.calibration."""
