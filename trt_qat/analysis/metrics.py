"""Metrics for sensitivity analysis: ``metric_fn(model) -> float``, higher is better.

:func:`map_metric` (mAP50-95 through the same evaluation as ``trt-qat eval``) or, without labels,
:func:`sqnr_metric` (output SQNR in dB against FP32), built on :func:`sqnr`.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from trt_qat.errors import TrtQatError

__all__ = ["SQNR_CAP_DB", "sqnr", "sqnr_metric", "map_metric"]

#: SQNR reported when the output is bit-identical to the reference (keeps JSON finite)
SQNR_CAP_DB = 200.0


def sqnr(reference: torch.Tensor, output: torch.Tensor, dim: int | None = None) -> float:
    """Signal-to-quantization-noise ratio in dB, ``10 log10(sum ref^2 / sum (ref - out)^2)``.

    Args:
        reference (torch.Tensor): the FP32 output.
        output (torch.Tensor): the quantized output, same shape.
        dim (int | None): compute one SQNR per index along this dimension (e.g. ``-1`` for the fields of a
            decoded detector output: box, objectness, classes) and average them in dB, so that large-valued fields
            (pixel coordinates) do not hide the others. Defaults to None (one SQNR over the whole tensor).

    Returns:
        float: SQNR in dB, at most ``SQNR_CAP_DB`` (identical tensors).
    """
    ref = reference.detach().double()
    err = (ref - output.detach().double()).pow(2)
    ref = ref.pow(2)
    if dim is None:
        sig, noise = ref.sum().reshape(1), err.sum().reshape(1)
    else:
        d = dim % ref.dim()
        sig = ref.movedim(d, 0).reshape(ref.shape[d], -1).sum(1)
        noise = err.movedim(d, 0).reshape(ref.shape[d], -1).sum(1)
    tiny = torch.finfo(torch.float64).tiny
    db = 10.0 * torch.log10(sig.clamp_min(tiny) / noise.clamp_min(tiny))
    db = torch.where(noise == 0, torch.full_like(db, SQNR_CAP_DB), db.clamp(max=SQNR_CAP_DB))
    if not torch.isfinite(db).all():
        raise TrtQatError("the model produced NaN/inf outputs; check the checkpoint's amax values and the inputs")
    return float(db.mean())


def _outputs(model: nn.Module, batches) -> list:
    """Every output tensor of ``model`` on ``batches`` (eval mode, no grad), flattened in order."""
    from trt_qat.calibration.calibrate import batch_input

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(batch_input(batch).to(device))
                stack = [out]
                while stack:
                    item = stack.pop(0)
                    if isinstance(item, torch.Tensor):
                        outs.append(item.float().cpu())
                    elif isinstance(item, dict):
                        stack = list(item.values()) + stack
                    elif isinstance(item, (list, tuple)):
                        stack = list(item) + stack
    finally:
        model.train(was_training)
    if not outs:
        raise TrtQatError("the model returned no tensors on the SQNR batches; sqnr_metric needs tensor outputs")
    return outs


def sqnr_metric(reference_model: nn.Module, batches, dim: int | None = None):
    """A metric for data without labels: the mean output SQNR (dB) of a model against ``reference_model``.

    The reference outputs are computed once, now; so ``reference_model`` may be the quantized model itself inside
    ``trt_qat.analysis.toggle.layers_in_float(model)`` (all quantizers bypassed), which is what the CLI does.

    Args:
        reference_model (nn.Module): the FP32 reference.
        batches (Iterable): a few input batches (tensors, ``(tensor, ...)`` tuples or dicts with "images"); they are
            kept in memory. Two or three are enough to rank layers.
        dim (int | None): see :func:`sqnr`; ``-1`` suits decoded detector outputs. Defaults to None.

    Returns:
        Callable[[nn.Module], float]: ``metric_fn(model)``, higher is better.
    """
    from trt_qat.calibration.calibrate import batch_input

    batches = [batch_input(b) for b in batches]
    if not batches:
        raise TrtQatError("sqnr_metric needs at least one input batch; pass a few batches of images")
    reference = _outputs(reference_model, batches)

    def metric_fn(model: nn.Module) -> float:
        outs = _outputs(model, batches)
        if len(outs) != len(reference) or any(o.shape != r.shape for o, r in zip(outs, reference)):
            raise TrtQatError("the model's outputs differ in number or shape from the reference model's; compare "
                              "the same architecture")
        return sum(sqnr(r, o, dim) for r, o in zip(reference, outs)) / len(reference)

    metric_fn.name = "sqnr_db"
    metric_fn.unit = "dB"
    return metric_fn


class _MaterializedDetection(torch.utils.data.Dataset):
    """The first ``n`` letterboxed items of a detection dataset, decoded once and kept in memory."""

    def __init__(self, dataset, n: int):
        self.items = [dataset[i] for i in range(n)]
        self._gt = dataset.coco_ground_truth()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def coco_ground_truth(self):
        return self._gt


@contextlib.contextmanager
def _quiet_tqdm():
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def map_metric(dataset, batch_size: int = 16, max_images: int | None = None, key: str = "map50_95",
               device=None, cache_limit_mb: float = 1024.0):
    """A metric from labels: the detector's COCO mAP through :func:`trt_qat.measure.evaluate.evaluate` and a
    TorchRunner.

    Args:
        dataset (DetectionDataset): e.g. ``YoloDataset(data_yaml, "val")``.
        batch_size (int): Defaults to 16.
        max_images (int | None): evaluate only the first N images. Defaults to all.
        key (str): "map50_95" or "map50". Defaults to "map50_95".
        device (str | None): Defaults to the model's device.
        cache_limit_mb (float): letterboxed images are decoded once and kept in memory when they fit in this many
            MB (every layer is evaluated on the same images). Defaults to 1024.

    Returns:
        Callable[[nn.Module], float]: ``metric_fn(model)`` in mAP units (0..1), higher is better.
    """
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.runners.torch_runner import TorchRunner

    if key not in ("map50_95", "map50"):
        raise TrtQatError(f"map_metric key '{key}' is unknown; use 'map50_95' or 'map50'")
    if len(dataset) == 0:
        raise TrtQatError("the evaluation dataset is empty; point it at a split with images")
    n = len(dataset) if max_images is None else min(len(dataset), max(int(max_images), 1))
    item_mb = dataset[0][0].numel() * 4 / 2**20
    data = _MaterializedDetection(dataset, n) if n * item_mb <= cache_limit_mb else dataset

    def metric_fn(model: nn.Module) -> float:
        with _quiet_tqdm():
            result = evaluate(TorchRunner(model, device=device), data, batch_size=batch_size, max_images=n)
        return float(result[key])

    metric_fn.name = key
    metric_fn.unit = "mAP"
    return metric_fn
