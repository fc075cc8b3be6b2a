"""trt_qat: PyTorch model -> explicit Q/DQ quantization-aware training -> fast, accurate INT8 TensorRT engine.

Importing the package loads torch and pytorch-quantization (both required) but never TensorRT, pycuda or
ONNX Runtime: those are imported lazily by the stages that need them.
"""
from __future__ import annotations

import warnings

__version__ = "0.1.0"

with warnings.catch_warnings():  # pytorch-quantization 2.1.3 uses torch.jit.script at import time
    warnings.simplefilter("ignore", FutureWarning)
    from trt_qat.calibration.calibrate import calibrate, collect_stats, compute_amax, load_amax, save_amax  # noqa: E402
    from trt_qat.config import CalibConfig, ExportConfig, QATConfig, QuantConfig  # noqa: E402
    from trt_qat.errors import TrtQatError  # noqa: E402
    from trt_qat.onnx.export import export_onnx  # noqa: E402
    from trt_qat.quant.checkpoint import load_quantized, save_quantized
    from trt_qat.quant.instrument import quantize, quantizer_summary
    from trt_qat.quant.quantizer import iter_quantizers
    from trt_qat.train.qat import finetune  # noqa: E402

__all__ = [
    "CalibConfig", "ExportConfig", "QATConfig", "QuantConfig", "TrtQatError", "__version__",
    "calibrate", "collect_stats", "compute_amax", "export_onnx", "finetune", "iter_quantizers", "load_amax",
    "load_quantized", "quantize", "quantizer_summary", "save_amax", "save_quantized",
]
