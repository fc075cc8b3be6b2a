"""Quantizers on the output of a torch function (``q @ k``, ``softmax``, ``x + y``) called inside a module's forward.

The placement rules quantize a tensor at the module that produces it (an *output quantizer*, see
:mod:`trt_qat.quant.hooks`). Some tensors that need a Q/DQ pair are not produced by any module: the MatMul
inputs and outputs of an attention block, or the running sum of a block that adds two residuals in a row
(Ultralytics' ``PSABlock``: ``x = x + attn(x); x = x + ffn(x)``). Those are quantized where the function is called,
without touching the model's code:

* the *scope* module (the one whose ``forward`` calls the function) holds the quantizers in a ModuleDict,
  ``module._trt_qat_output_quantizers_fn``, so they are in its state dict and ``quant.skip`` patterns can name
  them;
* :class:`FunctionQuantHooks`, a forward pre-hook and forward hook on the scope module, pushes a
  :class:`torch.overrides.TorchFunctionMode` for the calls of that module that have something to quantize, and
  pops it afterwards (also when the forward raises);
* the mode counts, per function name, the calls made directly in that forward (calls inside child modules are
  not counted: :class:`ChildDepth` hooks on the children say when one runs) that return a floating-point tensor,
  exactly as the dataflow trace (:mod:`trt_qat.quant.trace`) numbered them, and applies the quantizer to the
  call's output.

It works in training, evaluation, under ``torch.no_grad`` and in ``torch.onnx.export`` (the quantizer's own ops
are what the exporter records). Everything is a plain class, so quantized models stay deep-copyable and picklable.
"""
from __future__ import annotations

import torch

from trt_qat.quant.hooks import FCALLS_ATTR, replace_at
from trt_qat.quant.trace import flatten

__all__ = ["FUNCS_ATTR", "FCALLS_ATTR", "FunctionQuantHooks", "ChildDepth"]

#: the ModuleDict attribute holding the quantizers of function outputs computed in a module's forward (its name
#: contains ``_trt_qat_output_quantizers``, so ``quant.skip`` patterns for output quantizers also match it)
FUNCS_ATTR = "_trt_qat_output_quantizers_fn"
#: the active mode of a scope module (in ``module.__dict__``)
_MODE_ATTR = "_trt_qat_fmode"


class _Mode(torch.overrides.TorchFunctionMode):
    """Applies ``quantizers[key]`` to the output of the ``ordinal``-th call of function ``name`` (per name, calls
    returning a tensor, outside child modules)."""

    def __init__(self, quantizers, entries: dict):
        super().__init__()
        self.quantizers = quantizers
        self.entries = entries  # (name, ordinal) -> [(pos, key)]
        self.names = {name for name, _ in entries}
        self.counts = {}
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth:
            return out
        name = getattr(func, "__name__", None)
        if name not in self.names or not any(t.is_floating_point() for _, t in flatten(out)):
            return out  # (under torch.jit tracing, shape arithmetic runs on integer tensors: not counted)
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        for pos, key in self.entries.get((name, k), ()):
            out = replace_at(out, pos, self.quantizers[key])
        return out


class FunctionQuantHooks:
    """Forward pre-hook and forward hook (``always_call``) of a scope module: quantize the outputs of the function
    calls its forward makes, as planned. One instance per module.

    Args:
        calls_per_forward (int): how many times the module runs in one forward of the model (the call index wraps
            around).
        plan (dict[int, list[tuple[str, int, tuple, str]]]): call index -> [(function name, ordinal among that
            function's calls in this forward, output position, ModuleDict key)].
    """

    def __init__(self, calls_per_forward: int, plan: dict):
        self.calls_per_forward = max(int(calls_per_forward), 1)
        self.plan = {}
        for call, entries in plan.items():
            by_fn = self.plan.setdefault(int(call), {})
            for name, ordinal, pos, key in entries:
                by_fn.setdefault((str(name), int(ordinal)), []).append((tuple(pos), str(key)))

    def pre(self, module, args):
        idx = module.__dict__.get(FCALLS_ATTR, 0) % self.calls_per_forward
        module.__dict__[FCALLS_ATTR] = idx + 1
        entries = self.plan.get(idx)
        if not entries:
            return None
        mode = _Mode(module._modules[FUNCS_ATTR], entries)
        module.__dict__.setdefault(_MODE_ATTR, []).append(mode)
        mode.__enter__()
        return None

    def post(self, module, args, output):
        stack = module.__dict__.get(_MODE_ATTR)
        if stack:
            stack.pop().__exit__(None, None, None)
        return None

    def install(self, module):
        module.__dict__[FCALLS_ATTR] = 0
        module.register_forward_pre_hook(self.pre)
        module.register_forward_hook(self.post, always_call=True)
        for child in module.children():
            depth = ChildDepth(module)
            child.register_forward_pre_hook(depth.pre)
            child.register_forward_hook(depth.post, always_call=True)


class ChildDepth:
    """Hooks on a child of a scope module: while the child runs, the scope's mode does not count function calls
    (they belong to the child's forward, not to the scope's)."""

    def __init__(self, scope):
        object.__setattr__(self, "scope", scope)

    def _mode(self):
        stack = self.scope.__dict__.get(_MODE_ATTR)
        return stack[-1] if stack else None

    def pre(self, module, args):
        mode = self._mode()
        if mode is not None:
            mode.depth += 1
        return None

    def post(self, module, args, output):
        mode = self._mode()
        if mode is not None and mode.depth > 0:
            mode.depth -= 1
        return None
