"""trt_qat.analysis: per-layer quantization sensitivity.

* :mod:`~trt_qat.analysis.toggle`: the quantized layers of a model, and putting some of them in float.
* :mod:`~trt_qat.analysis.metrics`: ``metric_fn(model)`` scores (output SQNR, COCO mAP).
* :mod:`~trt_qat.analysis.forward_cache`: reuse of unchanged sub-module outputs between metric runs.
* :mod:`~trt_qat.analysis.sensitivity`: the per-layer analysis and the automatic skip list.
* :mod:`~trt_qat.analysis.format`: tables, charts and report sections of the results.
"""
