"""A forward cache for sensitivity runs: reuse the outputs of sub-modules that the layer under test cannot change."""
from __future__ import annotations

import torch
from torch import nn

from trt_qat.analysis.toggle import is_quantizer, layer_table, owned_quantizers

__all__ = ["ForwardCache"]


def _leaves(obj, out: list) -> list:
    """Flatten nested tuples/lists/dicts into their leaves (dict keys kept as leaves for comparison)."""
    if isinstance(obj, (list, tuple)):
        out.append(type(obj))
        for x in obj:
            _leaves(x, out)
        out.append(len(obj))
    elif isinstance(obj, dict):
        out.append(dict)
        for k, v in obj.items():
            out.append(k)
            _leaves(v, out)
    else:
        out.append(obj)
    return out


def _same_leaf(recorded, version, current) -> bool:
    if isinstance(recorded, torch.Tensor):
        if not isinstance(current, torch.Tensor):
            return False
        if current is recorded:
            return current._version == version   # the same tensor: unchanged unless modified in place since
        if current.shape != recorded.shape or current.dtype != recorded.dtype or current.device != recorded.device:
            return False
        # downstream of a changed layer every value differs: a few elements settle most mismatches cheaply
        head = min(current.numel(), 64)
        return (torch.equal(current.reshape(-1)[:head], recorded.reshape(-1)[:head])
                and torch.equal(current, recorded))
    if isinstance(current, torch.Tensor):
        return False
    try:
        return bool(recorded is current or recorded == current)
    except Exception:  # noqa: BLE001 - an uncomparable argument means "not the same call"
        return False


class ForwardCache:
    """Reuse sub-module outputs that a sensitivity run cannot have changed.

    One *recording* run of the metric stores each module call's inputs and output (in the reference state: all
    quantized for leave-one-out, all float for only-one). In later runs, a module whose subtree holds no changed
    layer and whose inputs equal the recorded ones (same tensor object and unmodified, else ``torch.equal``)
    returns the recorded output instead of computing it; so everything upstream of the layer under test is
    skipped. Outputs modified in place since they were recorded are never reused. Calls are keyed by
    (forward of the root module, module, call number), so several batches and repeated calls work.
    """

    def __init__(self, model: nn.Module, budget_mb: float):
        self.model = model
        self.budget = float(budget_mb) * 2**20
        self.used = 0.0
        self.records = {}
        self.recording = False
        self.changed = set()
        self.hits = self.calls = 0
        self._root_calls = -1
        self._counts = {}
        self._wrapped = []
        # module -> the layers in its subtree
        self._subtree = {m: {x for x in m.modules() if owned_quantizers(x)} for m in model.modules()}
        self._stored = set()

    def __enter__(self):
        for module in self.model.modules():
            if "forward" in module.__dict__ or is_quantizer(module):
                continue   # an instance-level forward is the user's: leave it; quantizers are cheap
            module.forward = self._make_forward(module, module.forward, module is self.model)
            self._wrapped.append(module)
        return self

    def __exit__(self, *exc):
        for module in self._wrapped:
            module.__dict__.pop("forward", None)
        self._wrapped.clear()
        self.records.clear()
        return False

    def start(self, recording: bool = False, changed=()):
        """Begin one metric run: ``recording`` for the reference run, else the layer names changed from it."""
        self.recording = recording
        table = layer_table(self.model)
        objs = {table[n] for n in changed if n in table}
        self.changed = {m for m, layers in self._subtree.items() if layers & objs}
        self._root_calls = -1

    def _size(self, obj) -> float:
        total = 0.0
        for t in _leaves(obj, []):
            if isinstance(t, torch.Tensor) and id(t) not in self._stored:
                self._stored.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def _make_forward(self, module, original, is_root):
        def forward(*args, **kwargs):
            if is_root:
                self._root_calls += 1
                self._counts = {}
                return original(*args, **kwargs)
            k = self._counts.get(module, 0)
            self._counts[module] = k + 1
            key = (self._root_calls, module, k)
            if self.recording:
                out = original(*args, **kwargs)
                if self.used < self.budget:
                    inputs = _leaves((args, kwargs), [])
                    self.used += self._size(inputs) + self._size(out)
                    outs = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor)]
                    self.records[key] = (inputs, [t._version if isinstance(t, torch.Tensor) else None
                                                  for t in inputs], out, [t._version for t in outs])
                return out
            self.calls += 1
            rec = self.records.get(key)
            if rec is not None and module not in self.changed:
                inputs, in_versions, out, out_versions = rec
                current = _leaves((args, kwargs), [])
                outs = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor)]
                if (len(current) == len(inputs) and all(t._version == v for t, v in zip(outs, out_versions))
                        and all(_same_leaf(r, v, c) for r, v, c in zip(inputs, in_versions, current))):
                    self.hits += 1
                    return out
            return original(*args, **kwargs)

        return forward
