"""Cross-rank calibration: every rank collects statistics on its own shard, then they are combined.

Each rank collects statistics on its own shard; :func:`all_reduce_calibrators` then combines
them so that every rank holds what one process would have collected on all the data: the running max is
all-reduced with MAX and the histograms with SUM. Summing histograms is only exact when the ranks used the same
bins. :class:`~trt_qat.quant.calibrator.HistogramMaxCalibrator` derives its bin width from the first batch's max
and grows by appending bins of that width, and a value's bin depends on the width alone; so the ranks agree on the
first batch's max (one all-reduce MAX per quantizer, at the first batch only, see :func:`sync_calibrators`) and their
histograms then differ only in length: they are padded to the longest and summed. With a
``DistributedSampler(shuffle=False)`` and a per-rank batch ``B``, the ranks' k-th batches together are exactly
the k-th batch of one process with batch ``N * B``, so the merged histograms, and the amax of every method,
equal that single process's (tests/calibration/test_distributed.py checks it). A two-pass scheme (agree on the
global max first) would need the data twice; this needs it once.

"""
from __future__ import annotations

import math

import torch

from trt_qat.dist import comm_device, get_world_size, is_distributed
from trt_qat.errors import LOG
from trt_qat.quant.quantizer import activation_quantizers

__all__ = ["sync_calibrators", "all_reduce_calibrators"]


def _calibrators(model):
    return [(name, q._calibrator) for name, q in activation_quantizers(model)
            if hasattr(q._calibrator, "collect_histogram")]


def sync_calibrators(model, enable: bool = True) -> int:
    """Make every activation calibrator agree on its first batch's max across ranks (so the bins agree).

    Called by :func:`trt_qat.calibrate.collect_stats` when a group is up; every rank must then run the same
    quantizers in the same order on its first batch, as DistributedDataParallel already requires.

    Returns:
        int: the number of calibrators set.
    """
    cals = _calibrators(model)
    for _, cal in cals:
        cal.sync_group = True if (enable and is_distributed()) else None
    return len(cals)


def all_reduce_calibrators(model) -> int:
    """Combine the activation calibrators' statistics of all ranks; afterwards every rank holds the same.

    The running max is reduced with MAX, the histograms with SUM (padded to the longest). Histograms collected with
    different bin widths (calibrators that were not synchronised by :func:`sync_calibrators`) cannot be summed
    exactly: they are then re-binned onto the widest width (each bin's count goes to the bin holding its centre)
    and a warning is logged.

    Args:
        model (nn.Module): a quantized model after ``collect_stats`` on every rank.

    Returns:
        int: the number of calibrators reduced (0 in a single process).
    """
    if not is_distributed():
        return 0
    dist = torch.distributed
    dev = comm_device()
    cals = _calibrators(model)
    # 1. running max: one flat MAX (-inf marks a calibrator that saw nothing on this rank)
    amax = torch.tensor([float(c.amax.max()) if c.amax is not None else -math.inf for _, c in cals],
                        dtype=torch.float64, device=dev)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX)
    # 2. histogram shapes of every rank
    meta = [(c.width, c.hist.numel()) if c.hist is not None else None for _, c in cals]
    metas = [None] * get_world_size()
    dist.all_gather_object(metas, meta)
    plan, total = [], 0
    for i, (name, _) in enumerate(cals):
        shapes = [m[i] for m in metas if m[i] is not None]
        if not shapes:
            plan.append(None)
            continue
        width = max(w for w, _ in shapes)
        if any(w != width for w, _ in shapes):
            LOG.warning("calibrator '%s' has different bin widths on different ranks; re-binning onto the widest "
                        "(not exact: collect with trt_qat.calibrate.collect_stats, which synchronises the bins)", name)
        length = max(math.ceil(n * w / width) for w, n in shapes)
        plan.append((total, width, length))
        total += length
    flat = torch.zeros(total, dtype=torch.float64, device=dev)
    for (_, cal), p in zip(cals, plan):
        if p is None or cal.hist is None:
            continue
        off, width, length = p
        hist = cal.hist.detach().to(dev, torch.float64)
        if cal.width == width:
            flat[off: off + hist.numel()] += hist
        else:
            centres = (torch.arange(hist.numel(), dtype=torch.float64, device=dev) + 0.5) * cal.width
            idx = torch.div(centres, width, rounding_mode="floor").long().clamp_(max=length - 1)
            flat[off: off + length].index_add_(0, idx, hist)
    dist.all_reduce(flat)
    for i, ((_, cal), p) in enumerate(zip(cals, plan)):
        value = float(amax[i])
        if value == -math.inf:
            continue
        device = cal.amax.device if cal.amax is not None else torch.device("cpu")
        cal.amax = torch.tensor(value, dtype=torch.float32, device=device)
        if p is not None:
            off, width, length = p
            hist_device = cal.hist.device if cal.hist is not None else device
            cal.hist = flat[off: off + length].clone().to(hist_device)
            cal.width = width
    return len(cals)
