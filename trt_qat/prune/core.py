"""Dependency-aware structured channel pruning through Torch-Pruning (DepGraph), sized for INT8 engines.

:func:`prune` removes whole channels from a model in place, with every coupled layer (a residual Add's inputs,
the branches of a Concat, the BatchNorm after a conv) pruned together by Torch-Pruning's dependency graph, until
the model holds at most ``target_macs`` of its MACs (and/or ``target_params`` of its parameters). Channel counts
stay multiples of ``round_to`` (INT8 kernels want multiples of 8); the detection head's output convs (every conv
whose output reaches a model output through no other conv) and the ``keep`` layers stay whole. The model is marked
pruned, so its adapter saves its layer shapes with its architecture (:mod:`trt_qat.models.reshape`).

Torch-Pruning is an optional dependency (``pip install trt-qat[prune]``), imported on first use.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from trt_qat.errors import LOG, TrtQatError
from trt_qat.models.reshape import layer_shapes, mark_pruned

__all__ = ["IMPORTANCES", "require_torch_pruning", "count_macs_params", "head_output_layers", "match_keep",
           "check_target", "prune", "pruned_copy"]

IMPORTANCES = ("magnitude", "bn_scale")
_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def require_torch_pruning():
    """The ``torch_pruning`` module, or one TrtQatError naming the extra that installs it."""
    try:
        import torch_pruning
    except ImportError:
        raise TrtQatError("pruning needs Torch-Pruning, which is not installed; pip install trt-qat[prune] "
                          "(or pip install 'torch-pruning>=1.6,<2')") from None
    return torch_pruning


def check_target(value, flag: str):
    """``value`` as a float in (0, 1], or None; anything else is one TrtQatError naming ``flag``."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TrtQatError(f"{flag}={value!r} is not a number; give the fraction of the unpruned model to keep, "
                          "in (0, 1], e.g. 0.6") from None
    if not 0.0 < value <= 1.0:
        raise TrtQatError(f"{flag}={value:g} is outside (0, 1]; give the fraction of the unpruned model to keep, "
                          "e.g. 0.6 for 60%")
    return value


def count_macs_params(model: nn.Module, example_input) -> tuple:
    """``(MACs, parameters)`` of one forward of ``model`` (eval mode) on ``example_input``."""
    tp = require_torch_pruning()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example_input)
    finally:
        model.train(was_training)
    return float(macs), float(params)


class _Tracker:
    """Forward pre-hooks that remember the last module entered: the layer to name when a forward fails."""

    def __init__(self, model: nn.Module):
        self.current = None
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in model.named_modules() if name]

    def _hook(self, name):
        def hook(_module, _inputs):
            self.current = name
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _first_line(exc) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"


def _after_pruning(layer, exc, when: str = "after pruning") -> str:
    return (f"{when}, the forward fails in or right after layer '{layer}' ({_first_line(exc)}); Torch-Pruning "
            f"cannot trace a channel dependency there (a hard-coded channel count?): pass --keep "
            f"'^{re.escape(str(layer))}$' to leave it whole")


def _run_checked(model: nn.Module, example_input, when: str):
    """One forward in eval and in train mode; a failure is one TrtQatError naming the layer it failed in."""
    tracker = _Tracker(model)
    was_training = model.training
    try:
        with torch.no_grad():
            for mode in (False, True):
                model.train(mode)
                for m in model.modules():  # train-mode paths, with BatchNorm statistics left untouched
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
                model(example_input)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is reported as one line
        raise TrtQatError(_after_pruning(tracker.current, exc, when)) from None
    finally:
        tracker.close()
        model.train(was_training)


def head_output_layers(model: nn.Module, graph) -> list:
    """Names of the convs/linears whose output reaches a model output through no other conv/linear (the detection
    head's outputs), plus the frozen ones (fixed weights, e.g. Ultralytics' DFL), from Torch-Pruning's graph."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for module, node in graph.module2node.items():
        if not isinstance(module, _PRUNABLE):
            continue
        if not module.weight.requires_grad:
            out.append(names.get(module))
            continue
        seen, stack, feeds_layer = set(), list(node.outputs), False
        while stack and not feeds_layer:
            nxt = stack.pop()
            if id(nxt) in seen:
                continue
            seen.add(id(nxt))
            if isinstance(nxt.module, _PRUNABLE) and nxt.module.weight.requires_grad:  # (a frozen one: output)
                feeds_layer = True
            else:
                stack.extend(nxt.outputs)
        if not feeds_layer:
            out.append(names.get(module))
    return sorted(n for n in out if n)


def match_keep(model: nn.Module, keep, flag: str = "--keep") -> list:
    """The names of ``model``'s convs/linears that the ``keep`` regexes match (searched anywhere in the name).

    Raises:
        TrtQatError: a pattern is not a valid regex, or matches no conv/linear.
    """
    layers = [n for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]
    found = []
    for pattern in keep or ():
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise TrtQatError(f"{flag} {pattern!r} is not a valid regex ({exc}); fix the pattern") from None
        hits = [n for n in layers if rx.search(n)]
        if not hits:
            raise TrtQatError(f"{flag} {pattern!r} matches no conv or linear layer; layer names look like "
                              f"{', '.join(repr(n) for n in layers[:3])}")
        found.extend(hits)
    return sorted(set(found))


def _untraced(model: nn.Module, graph) -> list:
    return [n for n, m in model.named_modules()
            if isinstance(m, _PRUNABLE) and m.weight.requires_grad and m not in graph.module2node]


def _importance(tp, name: str):
    if name not in IMPORTANCES:
        raise TrtQatError(f"unknown importance '{name}'; use one of {', '.join(IMPORTANCES)}")
    return tp.importance.BNScaleImportance() if name == "bn_scale" else tp.importance.MagnitudeImportance(p=2)


def _failing_groups(pruner, model) -> list:
    """The root layers of the dependency groups whose importance Torch-Pruning cannot compute (index errors in its
    channel mapping), in graph order."""
    names = {m: n for n, m in model.named_modules()}
    failed = []
    try:
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                              root_module_types=pruner.root_module_types):
            try:
                pruner.estimate_importance(group)
            except Exception:  # noqa: BLE001
                failed.append(names.get(group[0].dep.target.module, str(group[0].dep.target)))
    except Exception:  # noqa: BLE001
        return ["unknown"]
    return failed


def prune(model: nn.Module, example_input, target_macs: float | None = None, target_params: float | None = None,
          importance: str = "magnitude", keep=(), round_to: int = 8, max_layer_ratio: float = 0.9,
          steps: int = 100, global_pruning: bool = False, auto_keep: bool = True) -> dict:
    """Prune ``model``'s channels in place until it holds at most ``target_macs`` of its MACs and/or
    ``target_params`` of its parameters.

    Args:
        model (nn.Module): an FP32 model (not quantized).
        example_input (Tensor): an input batch for tracing and counting MACs (e.g. ``adapter.sample_input(640)``).
        target_macs (float | None): fraction of the model's MACs to keep, in (0, 1].
        target_params (float | None): fraction of its parameters to keep, in (0, 1]. At least one target is needed.
        importance (str): "magnitude" (L2 norm of the coupled weights, the default) or "bn_scale" (|BatchNorm gamma|,
            network slimming; train with :func:`trt_qat.prune.slimming.bn_sparsity_train` first).
        keep (Sequence[str]): regexes of layer names left whole (searched anywhere in the name).
        round_to (int): channel counts stay multiples of this. Defaults to 8.
        max_layer_ratio (float): at most this fraction of any layer's channels is removed. Defaults to 0.9.
        steps (int): granularity of the schedule: each step removes ``max_layer_ratio / steps`` more of every
            prunable layer's channels, and pruning stops at the first step that meets the targets. Defaults to 100.
        global_pruning (bool): rank channels across layers instead of per layer. Defaults to False.
        auto_keep (bool): keep whole, with a warning naming them, the dependency groups whose channel indices
            Torch-Pruning cannot map (Ultralytics' C2f chunk); False raises instead. Defaults to True.

    Returns:
        dict: ``macs``/``params`` before and after, their ``ratio``s, ``kept`` (layer names left whole),
        ``pruned_layers`` ({name: [before, after] output channels}) and ``steps``.

    Raises:
        TrtQatError: a target outside (0, 1], no target, a ``keep`` pattern that matches nothing, a layer
            Torch-Pruning cannot trace (named), or targets not reachable within ``max_layer_ratio``. The model may
            be partly pruned after an error raised while pruning.
    """
    tp = require_torch_pruning()
    target_macs, target_params = check_target(target_macs, "--target-macs"), check_target(target_params,
                                                                                            "--target-params")
    if target_macs is None and target_params is None:
        raise TrtQatError("no pruning target; give --target-macs and/or --target-params (fractions in (0, 1])")
    if int(round_to) < 1:
        raise TrtQatError(f"--round-to {round_to} must be >= 1 (8 suits INT8 kernels)")
    if not 0 < float(max_layer_ratio) < 1:
        raise TrtQatError(f"--max-layer-ratio {max_layer_ratio:g} must be in (0, 1)")
    imp = _importance(tp, importance)
    kept_by_user = match_keep(model, keep)
    model.eval()
    _run_checked(model, example_input, "before pruning")
    macs0, params0 = count_macs_params(model, example_input)
    before = {n: s[0] for n, s in layer_shapes(model).items()}
    tracker = _Tracker(model)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception as exc:  # noqa: BLE001
        raise TrtQatError(f"Torch-Pruning cannot trace the model: it fails in layer '{tracker.current}' "
                          f"({_first_line(exc)}); pass --keep for that layer or simplify its forward") from None
    finally:
        tracker.close()
    untraced = _untraced(model, graph)
    if untraced:
        raise TrtQatError(f"Torch-Pruning cannot trace layer '{untraced[0]}' (its weights are used outside a module "
                          f"call, {len(untraced)} such layers in all); such a model cannot be pruned safely")
    head = head_output_layers(model, graph)
    kept = sorted(set(head) | set(kept_by_user))
    modules = dict(model.named_modules())

    def make_pruner():
        return tp.pruner.MetaPruner(model, example_input, importance=imp, pruning_ratio=float(max_layer_ratio),
                                    max_pruning_ratio=float(max_layer_ratio), iterative_steps=int(steps),
                                    ignored_layers=[modules[n] for n in kept], round_to=int(round_to),
                                    global_pruning=bool(global_pruning))

    pruner, untraceable = make_pruner(), []
    # groups whose channel indices Torch-Pruning cannot map (e.g. a chunk feeding both a Concat and a residual
    # branch, Ultralytics' C2f) are kept whole, each named in the log, before anything is pruned
    for _ in range(8 if auto_keep else 0):
        failed = [n for n in _failing_groups(pruner, model) if n not in kept and n in modules]
        if not failed:
            break
        untraceable += failed
        kept = sorted(set(kept) | set(failed))
        pruner = make_pruner()
    if untraceable:
        LOG.warning("Torch-Pruning cannot map the channels of %d dependency groups; kept whole: %s",
                    len(untraceable), ", ".join(untraceable))

    def done(macs, params):
        return ((target_macs is None or macs <= target_macs * macs0 + 1e-6)
                and (target_params is None or params <= target_params * params0 + 1e-6))

    macs, params, step = macs0, params0, 0
    while not done(macs, params) and step < int(steps):
        try:
            pruner.step()
        except Exception as exc:  # noqa: BLE001
            layer = (_failing_groups(pruner, model) or ["unknown"])[0]
            raise TrtQatError(f"Torch-Pruning cannot prune the group of layer '{layer}' ({_first_line(exc)}); "
                              f"pass --keep '^{re.escape(layer)}$' to leave it whole") from None
        step += 1
        tracker = _Tracker(model)
        try:
            macs, params = count_macs_params(model, example_input)
        except Exception as exc:  # noqa: BLE001
            raise TrtQatError(_after_pruning(tracker.current, exc)) from None
        finally:
            tracker.close()
    if not done(macs, params):
        raise TrtQatError(f"pruning reached {macs / macs0:.0%} of the MACs and {params / params0:.0%} of the "
                          f"parameters, not the target, with at most {max_layer_ratio:.0%} of any layer removed "
                          f"and {len(kept)} layers kept whole; raise the target or keep fewer layers")
    _run_checked(model, example_input, "after pruning")
    after = layer_shapes(model)
    changed = {n: [before[n], after[n][0]] for n in before if n in after and before[n] != after[n][0]
               and isinstance(modules.get(n), _PRUNABLE)}
    mark_pruned(model)
    result = {"macs": [macs0, macs], "params": [params0, params], "macs_ratio": macs / macs0,
              "params_ratio": params / params0, "kept": kept, "untraceable_kept": untraceable,
              "pruned_layers": changed, "steps": step,
              "importance": importance, "round_to": int(round_to)}
    LOG.info("pruned %d layers in %d steps: MACs %.3fG -> %.3fG (%.0f%%), params %.2fM -> %.2fM (%.0f%%); %d layers "
             "kept whole", len(changed), step, macs0 / 1e9, macs / 1e9, 100 * macs / macs0, params0 / 1e6,
             params / 1e6, 100 * params / params0, len(kept))
    return result


def pruned_copy(model: nn.Module, example_input, **kwargs) -> tuple:
    """``(pruned deep copy of model, report)``: :func:`prune` on a copy, ``model`` untouched."""
    clone = copy.deepcopy(model)
    return clone, prune(clone, example_input, **kwargs)
