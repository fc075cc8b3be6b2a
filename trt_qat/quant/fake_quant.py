"""Fake quantization with TensorRT / ONNX Q-DQ semantics, and the caches that keep it cheap on the CPU.

:func:`fake_quant` is the fake-quantization used by :class:`trt_qat.quant.quantizer.TrtQuantizer` (amax in, Q/DQ
out): bit-for-bit the function of torch's ``fake_quantize_per_tensor_affine`` /
``fake_quantize_per_channel_affine``, gradient included, but computed on the CPU with vectorised kernels (see its
docstring). That is ONNX QuantizeLinear + DequantizeLinear (range [-128, 127], round half to even) except at
exact ties ``x = (k + 0.5) * scale``, where torch multiplies by ``1/scale`` and ONNX divides by ``scale``, so the
two can round to neighbouring steps.

:class:`FakeQuantCache`, :func:`reuse_fake_quant` and :func:`remember_fake_quant` let a quantizer hand out the same
fake-quantized weight batch after batch while neither the weight nor amax changes. Set :data:`FAST_CPU_FAKE_QUANT`
to False to run torch's own fake-quant ops on the CPU too (same numbers, slower).
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref

import numpy as np
import torch
from torch import nn

__all__ = ["fake_quant", "FakeQuantCache", "reuse_fake_quant", "remember_fake_quant", "f32"]


def f32(v: float) -> float:
    """``v`` rounded to the nearest float32 (as a Python float).

    For one +, -, *, / of float32 operands, computing in double and rounding once to float32 gives the correctly
    rounded float32 result (double has more than 2 * 24 + 2 bits), i.e. exactly what float32 tensor arithmetic gives.
    """
    return float(np.float32(v))


@functools.lru_cache(maxsize=4096)
def _pass_edges(inv: float, qmin: int, qmax: int):
    """Where torch's fake-quant lets the gradient through, for float32 ``x`` and ``inv = 1/scale``.

    Returns ``(lo, hi, lo_open, hi_open)``: ``nearbyint(fl32(x * inv))`` lies in ``[qmin, qmax]`` exactly when
    ``lo <= x <= hi``, i.e. when ``lo_open < x < hi_open`` (the neighbouring float32 values). ``fl32(x * inv)`` is
    monotone in ``x``, so that set is an interval; its float32 ends are found by stepping ulp by ulp from the
    real-valued estimate and testing the predicate with the same float32 arithmetic.
    """
    inv_t = torch.tensor(inv, dtype=torch.float32)

    def inside(x):
        q = torch.round(torch.tensor(x, dtype=torch.float32) * inv_t)
        return bool((q >= qmin) & (q <= qmax))

    def step(x, toward):
        return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(toward, dtype=torch.float32)))

    lo = f32((qmin - 0.5) / inv)
    while inside(lo):
        lo = step(lo, -math.inf)
    while not inside(lo):
        lo = step(lo, math.inf)
    hi = f32((qmax + 0.5) / inv)
    while inside(hi):
        hi = step(hi, math.inf)
    while not inside(hi):
        hi = step(hi, -math.inf)
    return lo, hi, step(lo, -math.inf), step(hi, math.inf)


class _FakeQuantTensorCPU(torch.autograd.Function):
    """Per-tensor fake-quant on the CPU; the straight-through mask is applied in backward with one fused pass."""

    @staticmethod
    def forward(ctx, x, params, qmin, qmax):
        # x is kept for backward instead of a bool mask: building a mask costs two or three passes over x, while
        # hardtanh's backward kernel applies ``lo <= x <= hi`` to the gradient in one pass
        scale, inv, lo_open, hi_open = params
        ctx.edges = (lo_open, hi_open)
        ctx.save_for_backward(x)
        return _qdq_per_tensor(x, scale, inv, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # hardtanh's gradient: grad where lo_open < x < hi_open (i.e. lo <= x <= hi), else 0
        return torch.ops.aten.hardtanh_backward(grad, x, *ctx.edges), None, None, None


def _channel_scales(amax, bound: int, axis: int, ndim: int, cache: dict | None):
    """``(scale, 1/scale)`` float32 tensors shaped to broadcast along ``axis``, reused while amax is unchanged."""
    key = (axis, ndim, bound, amax.shape, amax.device)
    hit = cache.get("channel") if cache is not None else None
    if hit is not None and hit[0] == key and torch.equal(hit[1], amax):
        return hit[2], hit[3]
    shape = [1] * ndim
    shape[axis] = -1
    s = (amax.detach().reshape(-1) / bound).float().view(shape)
    inv = 1.0 / s  # float32 division, as torch's kernel computes 1.0f / scale
    if cache is not None:
        cache["channel"] = (key, amax.detach().clone(), s, inv)
    return s, inv


class _FakeQuantChannelCPU(torch.autograd.Function):
    """Per-channel fake-quant on the CPU as a few vectorised elementwise ops (weights are small)."""

    @staticmethod
    def forward(ctx, x, s, inv, qmin, qmax):
        t = (x * inv).round_()
        tmin, tmax = torch.aminmax(t)
        # weights rarely clip (amax is their calibrated max): then no mask, no clamp, identity backward
        ctx.clipped = not (float(tmin) >= qmin and float(tmax) <= qmax)
        if ctx.clipped:
            ctx.save_for_backward((t >= qmin) & (t <= qmax))
            t.clamp_(qmin, qmax)
        return t.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clipped:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None, None



#: whether torch.quantize_per_tensor + dequantize reproduces torch's fake-quant bit for bit here, per (qmin, qmax)
_QDQ_OK: dict = {}


def _qdq_per_tensor(x, scale: float, inv: float, qmin: int, qmax: int):
    """Per-tensor fake-quant value on the CPU (no autograd).

    ``torch.quantize_per_tensor(...).dequantize()`` runs vectorised INT8 kernels (about 20x faster than the
    scalar CPU kernel of ``fake_quantize_per_tensor_affine``). It is used after a one-time self-check shows that
    it gives the very same values; otherwise the exact composite ``clamp(round(x * inv), qmin, qmax) * scale``.
    """
    ok = _QDQ_OK.get((qmin, qmax))
    if ok is None:
        ok = _QDQ_OK[(qmin, qmax)] = _check_qdq(qmin, qmax)
    if ok and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return torch.quantize_per_tensor(x, scale, 0, torch.qint8 if qmin < 0 else torch.quint8).dequantize()
    return (x * inv).round_().clamp_(qmin, qmax).mul_(scale)


def _check_qdq(qmin: int, qmax: int) -> bool:
    if (qmin, qmax) not in ((-128, 127), (0, 255)):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is marked deprecated in recent torch
            g = torch.Generator().manual_seed(0)
            scale = f32(0.0173)
            inv = f32(1.0 / scale)
            x = torch.cat([torch.randn(4099, generator=g) * 2.0 * qmax * scale,
                           (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale,  # ties
                           torch.arange(-300, 300, dtype=torch.float32) * scale])
            ref = torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)
            got = torch.quantize_per_tensor(x, scale, 0, torch.qint8 if qmin < 0 else torch.quint8).dequantize()
            comp = (x * inv).round_().clamp_(qmin, qmax).mul_(scale)
            torch.quantize_per_tensor(x, scale, 0, torch.qint8)  # warn (once) inside the filter
            return bool(torch.equal(ref, got) and torch.equal(ref, comp))
    except Exception:  # no quantized tensors in this build
        return False


#: the last few per-tensor results as (weakref(input), input version, key, weakref(output), output version): two
#: quantizers with the same scale reading the very same, unchanged tensor (the two 1x1 convs of a C3/CSP block, a
#: neck conv and a head conv, once calibration gave them the same amax) share one fake-quant node instead of
#: computing it twice; the gradients of both consumers then meet in that node, as they would at the shared input
_RECENT: list = []


def _recent_get(x, key):
    if x.is_inference():
        return None
    for xref, version, k, yref, y_version in _RECENT:
        if k == key and xref() is x and x._version == version:
            y = yref()
            return y if y is not None and y._version == y_version else None
    return None


def _recent_put(x, key, y):
    if x.is_inference():
        return
    _RECENT.insert(0, (weakref.ref(x), x._version, key, weakref.ref(y), y._version))
    del _RECENT[8:]


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


#: set False to run torch's own fake-quant ops on the CPU too (same numbers, slower; for tests and benchmarks)
FAST_CPU_FAKE_QUANT = True


def _native_path(x) -> bool:
    """Use torch's own fake-quant ops: off the CPU, for non-float32 data, and while tracing/exporting/compiling."""
    return (x.device.type != "cpu" or x.dtype != torch.float32 or not FAST_CPU_FAKE_QUANT or torch.jit.is_tracing()
            or _is_compiling())


@functools.lru_cache(maxsize=4096)
def _tensor_params(amax: float, bound: int, qmin: int, qmax: int):
    """``(scale, 1/scale, lo_open, hi_open)`` in float32 for a per-tensor amax, or None when degenerate."""
    scale = f32(amax / bound)
    inv = f32(1.0 / scale) if scale > 0 else math.inf
    if not (scale > 0 and math.isfinite(scale) and math.isfinite(inv)):
        return None
    return (scale, inv) + _pass_edges(inv, qmin, qmax)[2:]


def fake_quant(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
               axis: int | None = None, cache: dict | None = None) -> torch.Tensor:
    """Symmetric fake quantization with TensorRT / ONNX Q-DQ semantics.

    ``scale = amax / (2**(num_bits-1) - 1)`` (``2**num_bits - 1`` unsigned), zero point 0,
    ``y = clamp(nearbyint(x * (1/scale)), qmin, qmax) * scale`` with the full range ``[-128, 127]`` (``[0, 255]``
    unsigned) and round-half-to-even; the gradient is straight-through where ``nearbyint(x * (1/scale))`` is in
    ``[qmin, qmax]`` and zero elsewhere. This is exactly ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine`` (forward and backward), which is what runs on CUDA, for non-float32
    inputs and while tracing (ONNX export). On the CPU the same numbers (for finite inputs) come from faster
    kernels: the per-tensor value from vectorised quantize/dequantize (self-checked once per process), a gradient
    mask only when some value actually clips (one ``aminmax``; the mask is then one fused ``hardtanh_backward``
    pass), and per-channel weights as a few vectorised elementwise ops, where torch's CPU fake-quant kernels are
    scalar loops about 20x slower than a SiLU.

    Args:
        inputs (torch.Tensor): data.
        amax (torch.Tensor): one element (per tensor) or one per channel along ``axis``.
        num_bits (int): Defaults to 8.
        unsigned (bool): Defaults to False.
        axis (int | None): channel axis for a per-channel ``amax``. Defaults to None.
        cache (dict | None): a per-quantizer dict in which per-channel scales are kept while amax is unchanged.
            Defaults to None (no reuse).

    Returns:
        torch.Tensor: the fake-quantized tensor.
    """
    bound = (1 << (num_bits - 1 + int(unsigned))) - 1
    qmin, qmax = (0, bound) if unsigned else (-bound - 1, bound)
    native = _native_path(inputs)
    if amax.numel() == 1:
        params = None if native else _tensor_params(float(amax), bound, qmin, qmax)
        if params is not None:
            grad = torch.is_grad_enabled() and inputs.requires_grad
            key = (params[0], qmin, qmax, grad)
            out = _recent_get(inputs, key)
            if out is None:
                if grad:
                    out = _FakeQuantTensorCPU.apply(inputs, params, qmin, qmax)
                else:
                    out = _qdq_per_tensor(inputs, params[0], params[1], qmin, qmax)
                _recent_put(inputs, key, out)
            return out
        # 0-d scale and zero-point: ONNX/TensorRT read a scalar as per-tensor (a 1-element 1-D tensor is
        # per-axis on axis 1 and is rejected by TensorRT)
        scale_t = (amax.detach().reshape(()) / bound).float()
        zero = torch.zeros((), dtype=torch.int32, device=inputs.device)
        return torch.fake_quantize_per_tensor_affine(inputs, scale_t, zero, qmin, qmax)
    axis = axis % inputs.dim()
    if native:
        scale_t = (amax.detach().reshape(-1) / bound).float()
        zero = torch.zeros(scale_t.numel(), dtype=torch.int32, device=inputs.device)
        return torch.fake_quantize_per_channel_affine(inputs, scale_t, zero, axis, qmin, qmax)
    s, inv = _channel_scales(amax, bound, axis, inputs.dim(), cache)
    if torch.is_grad_enabled() and inputs.requires_grad:
        # usual case, nothing clips: the straight-through gradient is the identity, so the value is written in place
        # into a clone (whose C++ backward is the identity) instead of going through a Python autograd Function
        out = inputs.clone()
        with torch.no_grad():
            t = out.mul_(inv).round_()
            tmin, tmax = torch.aminmax(t)
            if float(tmin) >= qmin and float(tmax) <= qmax:
                return out.mul_(s)
        return _FakeQuantChannelCPU.apply(inputs, s, inv, qmin, qmax)
    return (inputs * inv).round_().clamp_(qmin, qmax).mul_(s)


class FakeQuantCache(dict):
    """A quantizer's scratch space (per-channel scales, its last no-grad weight output); copies and pickles of the
    quantizer start with an empty one."""

    def __reduce__(self):
        return (FakeQuantCache, ())

    def __deepcopy__(self, memo):
        return FakeQuantCache()


def reuse_fake_quant(cache: dict, inputs: torch.Tensor, amax, scale_amax):
    """The output remembered by :func:`remember_fake_quant` for this very, unchanged ``inputs`` tensor and amax.

    "Unchanged" is judged as autograd judges it: same tensor object, storage and version counter (in-place ops
    bump it; writes through ``.data`` are invisible to autograd and to this check alike).
    """
    hit = cache.get("out")
    if hit is None or inputs.is_inference():
        return None
    ref, version, ptr, amax_copy, scale, out = hit
    if (ref() is not inputs or inputs._version != version or inputs.data_ptr() != ptr or scale != scale_amax
            or out.device != inputs.device or out.dtype != inputs.dtype or out.shape != inputs.shape):
        return None
    if (amax_copy is None) != (amax is None) or (amax is not None and not (
            amax_copy.shape == amax.shape and amax_copy.device == amax.device and torch.equal(amax_copy, amax))):
        return None
    return out


def remember_fake_quant(cache: dict, inputs: torch.Tensor, amax, scale_amax, out: torch.Tensor):
    """Keep ``out`` for ``inputs`` (weights, under ``torch.no_grad``): a weight is then fake-quantized once per
    evaluation or calibration run instead of once per batch. Only parameters are remembered."""
    if isinstance(inputs, nn.Parameter) and not inputs.is_inference():
        cache["out"] = (weakref.ref(inputs), inputs._version, inputs.data_ptr(),
                        None if amax is None else amax.detach().clone(), scale_amax, out)
    else:
        cache.pop("out", None)
