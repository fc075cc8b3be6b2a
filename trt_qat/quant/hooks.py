"""What the TensorRT placement rules (:mod:`trt_qat.quant.rules`) leave in a model, and what runs on every forward.

* :class:`QuantizedUpstream` replaces a layer's input quantizer when its input is already quantized upstream by the
  same shared quantizer, so the exported ONNX has one Q/DQ pair on that tensor instead of two.
* :class:`OutputQuantHook` (a forward hook) applies a module's output quantizers, registered under
  ``module._trt_qat_output_quantizers``, on the calls they belong to; :class:`ResetCallCounters` (a forward pre-hook
  on the root model) restarts the call count at every forward.

All three are plain classes or modules, so quantized models stay deep-copyable and picklable. Quantizers on the
output of a torch function (no module returns the tensor) live in :mod:`trt_qat.quant.functional`.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["QuantizedUpstream", "OutputQuantHook", "ResetCallCounters", "OUTPUTS_ATTR", "CALLS_ATTR", "FCALLS_ATTR",
           "replace_at"]

#: the ModuleDict attribute holding a module's output quantizers
OUTPUTS_ATTR = "_trt_qat_output_quantizers"
#: per-module call counter (in ``module.__dict__``, not a buffer)
CALLS_ATTR = "_trt_qat_calls"
#: per-module call counter of modules with function-output quantizers (:mod:`trt_qat.quant.functional`)
FCALLS_ATTR = "_trt_qat_fcalls"


class QuantizedUpstream(nn.Module):
    """Stands in for a layer's input quantizer when its input is already quantized upstream by the same
    (shared) quantizer, applied as an output quantizer on the producing module.

    It returns its input unchanged, so the exported ONNX has one Q/DQ pair on that tensor instead of two.
    Attribute reads it does not have (``amax``, ``disable()``, ...) go to the shared quantizer, which is not a
    submodule here (it is registered at its producer), so calibration and state dicts see it once.

    Args:
        shared (TensorQuantizer): the quantizer applied upstream.
    """

    def __init__(self, shared: nn.Module):
        super().__init__()
        object.__setattr__(self, "_shared", shared)

    @property
    def shared(self) -> nn.Module:
        return self.__dict__["_shared"]

    def forward(self, x):
        return x

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            shared = self.__dict__.get("_shared")
            if shared is None or name.startswith("__"):
                raise
            return getattr(shared, name)

    def extra_repr(self) -> str:
        return f"quantized upstream by a shared {type(self.shared).__name__}"


def replace_at(obj, pos, fn):
    """``obj`` with the tensor at nested position ``pos`` (tuple of indices/keys) replaced by ``fn(tensor)``."""
    if not pos:
        return fn(obj)
    head, rest = pos[0], pos[1:]
    if isinstance(obj, dict):
        new = type(obj)(obj) if not isinstance(obj, OrderedDict) else OrderedDict(obj)
        new[head] = replace_at(obj[head], rest, fn)
        return new
    items = list(obj)
    items[head] = replace_at(items[head], rest, fn)
    if isinstance(obj, list):
        return items
    if type(obj) is tuple:
        return tuple(items)
    try:  # namedtuple-like
        return type(obj)(*items)
    except TypeError:
        return tuple(items)


class OutputQuantHook:
    """Forward hook applying a module's output quantizers (``module._trt_qat_output_quantizers[key]``) on the
    calls they belong to. One instance per module; a plain class so that the model stays picklable.

    Args:
        calls_per_forward (int): how many times the module runs in one forward (the call index wraps around).
        plan (dict[int, list[tuple[tuple, str]]]): call index -> [(output position, ModuleDict key)].
    """

    def __init__(self, calls_per_forward: int, plan: dict):
        self.calls_per_forward = max(int(calls_per_forward), 1)
        self.plan = {int(k): [(tuple(p), str(key)) for p, key in v] for k, v in plan.items()}

    def __call__(self, module, args, output):
        idx = module.__dict__.get(CALLS_ATTR, 0) % self.calls_per_forward
        module.__dict__[CALLS_ATTR] = idx + 1
        entries = self.plan.get(idx)
        if not entries:
            return None
        quantizers = module._modules[OUTPUTS_ATTR]
        for pos, key in entries:
            output = replace_at(output, pos, quantizers[key])
        return output


class ResetCallCounters:
    """Forward pre-hook on the root model: resets the call counters of modules with output quantizers (and of
    modules with function-output quantizers)."""

    def __call__(self, module, args):
        for m in module.modules():
            for attr in (CALLS_ATTR, FCALLS_ATTR):
                if attr in m.__dict__:
                    m.__dict__[attr] = 0
        return None
