"""Statistics collection and amax computation for activation quantizers.

:class:`HistogramMaxCalibrator` collects, in one pass, both the running absolute maximum and a histogram of
absolute values (equal-width bins from 0, grown when a larger value arrives, as pytorch-quantization's
``HistogramCalibrator`` does). From that single pass any of the four methods can be computed:

- ``max``: the running absolute maximum;
- ``percentile``: the bin edge where the CDF reaches the percentile (:func:`amax_percentile`);
- ``mse``: the bin centre minimising the histogram-weighted quantization MSE (:func:`amax_mse`);
- ``entropy``: the bin edge minimising the KL divergence (TensorRT's entropy calibration, :func:`amax_entropy`).

The mse and entropy searches are vectorised over all candidate bins at once, run on whatever device the
histogram lives on (CPU included; the reference implementation calls ``.cuda()`` for mse), and reproduce the
reference algorithms' choices. :func:`bin_indices` is the one definition of an element's histogram bin.
"""
from __future__ import annotations

import math
import weakref

import torch

from trt_qat.quant.fake_quant import f32

__all__ = ["HistogramMaxCalibrator", "amax_percentile", "amax_mse", "amax_entropy", "bin_indices"]


def _all_reduce_max(t: torch.Tensor, group):
    """All-reduce ``t`` in place with MAX; a CPU tensor under an NCCL group (which reduces CUDA tensors only) goes
    through this rank's GPU."""
    import torch.distributed as dist

    group = None if group is True else group
    if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
        t.copy_(buf)
        return
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)


#: the last histogram counts as (weakref(input), input version, (width, length), counts); see _bin_counts
_RECENT_COUNTS: list = []


def bin_indices(x: torch.Tensor, width: float, length: int) -> torch.Tensor:
    """The histogram bin of every element, flat: ``trunc(fl32(|x| / width))`` (trunc toward zero, then abs), as
    16-bit integers when ``length`` bins fit, else 32-bit."""
    itype = torch.int16 if length <= 32767 else torch.int32
    return torch.div(x, width).to(itype).abs_().reshape(-1)


def _bin_counts(x: torch.Tensor, width: float, length: int, source: torch.Tensor) -> torch.Tensor:
    """``bincount(trunc(fl32(|x| / width)), minlength=length)`` as float64; reused when ``source`` (the tensor
    the quantizer was called with) is the very tensor counted last time, unchanged, with the same bins."""
    key = (width, length)
    inference = source.is_inference()
    if not inference:
        for xref, version, k, counts in _RECENT_COUNTS:
            if k == key and xref() is source and source._version == version:
                return counts.clone()
    counts = torch.bincount(bin_indices(x, width, length), minlength=length).to(torch.float64)
    if not inference:
        _RECENT_COUNTS.insert(0, (weakref.ref(source), source._version, key, counts))
        del _RECENT_COUNTS[8:]
    return counts.clone()


class HistogramMaxCalibrator:
    """Collects the absolute max and a histogram of |x| for a per-tensor activation quantizer.

    The histogram has equal-width bins ``[k * width, (k + 1) * width)`` from 0, ``width`` = first batch's max |x| /
    ``num_bins`` (a float32 value), and grows by appending bins when a larger value arrives, as
    pytorch-quantization's ``HistogramCalibrator`` does. An element's bin is ``trunc(fl32(|x| / width))``; for the
    first batch (and a power-of-two ``num_bins``) that is exactly ``torch.histc``'s bin, values equal to the max
    going to the last bin. Because the bin of a value depends only on ``width``, histograms collected with the same
    width merge exactly (summing, after padding to the longer one): that is how ranks of a distributed calibration
    are combined (see :mod:`trt_qat.dist`), with the first batch's max agreed across ranks.

    Counting uses ``bincount`` on 16-bit bin indices rather than ``histc`` (about 2x faster on the CPU, same
    counts), and a tensor that another quantizer has just counted with the same width (the two 1x1 convs of a
    CSP block read the same input) is counted once.

    Args:
        num_bins (int): initial number of bins. Defaults to 2048.
        num_bits (int): Defaults to 8.
        unsigned (bool): Defaults to False.
        collect_histogram (bool): when False only the max is tracked (cheaper). Defaults to True.
    """

    def __init__(self, num_bins: int = 2048, num_bits: int = 8, unsigned: bool = False, collect_histogram=True):
        self.num_bins = int(num_bins)
        self.num_bits = num_bits
        self.unsigned = unsigned
        self.collect_histogram = collect_histogram
        #: a torch.distributed process group (or True for the default group) with which the first batch's max is
        #: agreed, so that every rank bins with the same width; None: no agreement (single process)
        self.sync_group = None
        self.reset()

    def reset(self):
        self.amax = None  # running max of |x| (0-d tensor on the data's device)
        self.hist = None  # float64 counts
        self.width = None  # bin width (python float holding a float32 value)

    @property
    def empty(self) -> bool:
        return self.amax is None

    @torch.no_grad()
    def collect(self, x: torch.Tensor):
        source, x = x, x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        xmin, xmax = torch.aminmax(x)
        bmax = torch.maximum(xmax, -xmin)  # max |x|, without materialising |x|
        first = self.hist is None
        if first and self.collect_histogram and self.sync_group is not None:
            _all_reduce_max(bmax, self.sync_group)
        self.amax = bmax if self.amax is None else torch.maximum(self.amax, bmax)
        if not self.collect_histogram:
            return
        top = float(bmax)  # (a host sync on a GPU: the histogram length depends on it)
        if not math.isfinite(top):
            self.amax = torch.full_like(self.amax, math.nan)  # compute_amax reports non-finite data
            return
        if first:
            self.width = f32(max(top, 1e-8) / self.num_bins)
            self.hist = torch.zeros(self.num_bins, dtype=torch.float64, device=x.device)
        nbins = self.hist.numel()
        last = int(f32(top / self.width))  # bin of the largest value
        if last >= nbins and not first:
            grown = torch.zeros(last + 1, dtype=self.hist.dtype, device=self.hist.device)
            grown[:nbins] = self.hist
            self.hist, nbins = grown, last + 1
        counts = _bin_counts(x, self.width, max(nbins, last + 1), source)
        if counts.numel() > nbins:  # first batch: the max (and rounding up to it) goes to the last bin, as in histc
            counts[nbins - 1] += counts[nbins:].sum()
            counts = counts[:nbins]
        self.hist += counts

    def edges(self) -> torch.Tensor:
        n = self.hist.numel()
        return torch.arange(n + 1, dtype=torch.float64, device=self.hist.device) * self.width

    def compute_amax(self, method: str = "max", percentile: float = 99.99, start_bin: int = 128) -> torch.Tensor | None:
        """Return amax (0-d float32 tensor on the CPU) for ``method``, or None when nothing was collected."""
        if self.amax is None:
            return None
        if method == "max" or not bool(torch.isfinite(self.amax).all()):
            return self.amax.detach().float().cpu()  # non-finite data: the caller reports it
        if self.hist is None:
            raise ValueError(f"method '{method}' needs a histogram; collect with collect_histogram=True")
        hist, edges = self.hist, self.edges()
        if method == "percentile":
            value = amax_percentile(hist, edges, percentile)
        elif method == "mse":
            value = amax_mse(hist, edges, self.num_bits, self.unsigned, start_bin=start_bin)
        elif method == "entropy":
            value = amax_entropy(hist, edges, self.num_bits, self.unsigned, start_bin=start_bin)
        else:
            raise ValueError(f"unknown calibration method '{method}'")
        return torch.tensor(float(value), dtype=torch.float32)


def amax_percentile(hist: torch.Tensor, edges: torch.Tensor, percentile: float) -> float:
    """Bin edge at which the cumulative share of values reaches ``percentile`` (as the reference computes it)."""
    total = hist.sum()
    cdf = torch.cumsum(hist / total, 0)
    idx = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=cdf.dtype, device=cdf.device)))
    idx = min(idx, edges.numel() - 1)
    return float(edges[idx])


def amax_mse(hist, edges, num_bits=8, unsigned=False, start_bin=128, chunk=128) -> float:
    """Bin centre minimising ``mean(count * (fake_quant(centre) - centre)^2)``, as pytorch-quantization defines it.

    The quantized centres are computed exactly as the reference's ``fake_tensor_quant`` does (float32,
    ``round(c * (bound / amax))`` clamped to ``bound``, divided back). Speed comes from two observations:

    * every bin far enough above a candidate amax is clipped to the same value ``bound / scale``, so its share of
      the error is ``sum count * (q - c)^2`` over a suffix, from suffix sums of ``count``, ``count * c`` and
      ``count * c^2`` (float64); only the bins below the clip point of the largest candidate of a chunk (and only
      the non-empty ones) are quantized explicitly, which makes the search about n^2/2 instead of n^2 and far less
      for sparse, grown histograms;
    * the candidates within a relative 1e-6 of the best are then re-scored exactly as the reference does (float32
      products, float32 mean), and the first minimum is taken, as ``np.argmin`` does.
    """
    counts64 = hist.double()
    e32 = edges.float()
    centers = (e32[1:] + e32[:-1]) / 2  # float32, as the reference computes them
    c64 = centers.double()
    bound = float(2 ** (num_bits - 1 + int(unsigned)) - 1)
    n = centers.numel()
    if start_bin >= n:
        start_bin = 0
    dev = centers.device
    zero = torch.zeros(1, dtype=torch.float64, device=dev)

    def suffix(v):  # suffix[k] = sum(v[k:]), length n + 1
        return torch.cat([torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0]), zero])

    s0, s1, s2 = suffix(counts64), suffix(counts64 * c64), suffix(counts64 * c64 * c64)
    nz = torch.nonzero(counts64).flatten()
    bound_t = torch.tensor(bound, dtype=torch.float32, device=dev)
    scores = []
    for s in range(start_bin, n, chunk):
        amax = centers[s: s + chunk]
        scale = bound_t / amax  # float32, [k]
        clip_q = (bound_t / scale).double()  # the value every clipped bin is quantized to
        # bins at or beyond m are clipped for every candidate of the chunk (c * scale >= bound + 0.5, all scales)
        m = int(torch.searchsorted(centers * scale.min(), torch.tensor(bound + 0.5, device=dev)))
        cols = nz[nz < m]
        c = centers[cols]
        q = torch.clamp((c[None, :] * scale[:, None]).round_(), max=bound) / scale[:, None]
        head = ((q - c[None, :]).double() ** 2 * counts64[cols][None, :]).sum(1)
        tail = clip_q * clip_q * s0[m] - 2.0 * clip_q * s1[m] + s2[m]
        scores.append(head + tail.clamp_min(0.0))
    score = torch.cat(scores)
    best = float(score.min())
    near = torch.nonzero(score <= best * (1 + 1e-6) + 1e-30).flatten() + start_bin
    if near.numel() > 1:  # re-score the near-ties exactly as the reference does (float32) and keep the first minimum
        amax = centers[near]
        scale = bound_t / amax
        q = torch.clamp((centers[None, :] * scale[:, None]).round_(), -bound, bound) / scale[:, None]
        exact = ((q - centers[None, :]) ** 2 * hist.float()[None, :]).mean(1)
        return float(centers[int(near[int(torch.argmin(exact))])])
    return float(centers[int(near[0])])


def _entropy_dense(bins: torch.Tensor, cands: torch.Tensor, nq: int) -> torch.Tensor:
    """KL divergence of TensorRT's entropy calibration for each candidate threshold, bin by bin (exact, O(n) each)."""
    n = bins.numel()
    dev = bins.device
    idx = torch.arange(n, device=dev)
    suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(bins, [0]), 0), [0]),
                        torch.zeros(1, dtype=bins.dtype, device=dev)])
    out = []
    chunk = max(1, (1 << 22) // max(n, 1))
    for s in range(0, cands.numel(), chunk):
        ci = cands[s: s + chunk]
        c = ci.numel()
        valid = idx[None, :] < ci[:, None]
        gid = torch.div(idx[None, :] * nq, ci[:, None], rounding_mode="floor").clamp(max=nq - 1)
        nonzero = valid & (bins[None, :] != 0)
        gid_eff = torch.where(nonzero, gid, torch.full_like(gid, nq))  # nq = dump bucket
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        mass = torch.zeros(c, nq + 1, dtype=torch.float64, device=dev).scatter_add_(
            1, gid_eff, torch.where(nonzero, bins[None, :].expand(c, n), zero))
        cnt = torch.zeros(c, nq + 1, dtype=torch.float64, device=dev).scatter_add_(1, gid_eff, nonzero.double())
        per_bin = torch.where(cnt > 0, mass / cnt.clamp(min=1), torch.zeros_like(mass))
        q = torch.gather(per_bin, 1, gid_eff) * nonzero
        p = torch.where(valid, bins[None, :].expand(c, n), zero)
        p = p.scatter_add(1, (ci - 1).clamp(min=0)[:, None], suffix[ci][:, None])
        p_sum = p.sum(1, keepdim=True)
        q_sum = q.sum(1, keepdim=True)
        p = p / torch.where(p_sum > 0, p_sum, torch.ones_like(p_sum))
        q = q / torch.where(q_sum > 0, q_sum, torch.full_like(q_sum, math.nan))
        # scipy.stats.entropy(p, q): sum p*log(p/q); inf where p>0 and q==0
        mask = p > 0
        ratio = torch.where(mask & (q > 0), p / torch.where(q > 0, q, torch.ones_like(q)), torch.ones_like(p))
        kl = torch.where(mask, p * torch.log(ratio), torch.zeros_like(p)).sum(1)
        kl = torch.where((mask & (q <= 0)).any(1), torch.full_like(kl, math.inf), kl)
        kl = torch.where(q_sum.squeeze(1) > 0, kl, torch.full_like(kl, math.nan))
        out.append(kl)
    return torch.cat(out)


def amax_entropy(hist, edges, num_bits=8, unsigned=False, start_bin=128) -> float:
    """Bin edge minimising KL(reference || quantized) as TensorRT's entropy calibrator (and pytorch-quantization's
    ``_compute_amax_entropy``) defines it.

    For a threshold ``i`` the first ``i`` bins are merged into ``2**(num_bits-1)`` groups (bin ``j`` goes to group
    ``floor(nq * j / i)``), each group's mass is spread uniformly over its non-empty bins, and the outliers beyond
    ``i`` are folded into the last reference bin. With ``P`` the total count, ``Q`` the count below ``i`` and
    ``L`` prefix sums of ``b log b``::

        KL(i) = (sum_j p_j log p_j - sum_j p_j log q_j) / P + log(Q / P)
        sum_j p_j log p_j = L[i-1] + (b[i-1] + T) log(b[i-1] + T)            T = count beyond i
        sum_j p_j log q_j = sum_g mass_g log(mass_g / nonempty_g) + T log q[i-1]

    and each group's mass and number of non-empty bins are differences of prefix sums at its two boundaries
    ``ceil(g * i / nq)``: every candidate costs O(nq) instead of O(n) (the reference loops over bins in Python).
    The candidates within a relative 1e-7 of the best are then re-scored bin by bin (the reference's formula) and
    the last minimum is taken, as the reference does.
    """
    bins = hist.double().clone()
    if bins.numel() > 1:
        bins[0] = bins[1]
    nq = 1 << (num_bits - 1 + int(unsigned))
    n = bins.numel()
    dev = bins.device
    start_bin = min(start_bin, n)
    cands = torch.arange(max(start_bin, 1), n + 1, device=dev)
    zero = torch.zeros(1, dtype=torch.float64, device=dev)
    cb = torch.cat([zero, torch.cumsum(bins, 0)])  # cb[k] = sum(bins[:k])
    cn = torch.cat([zero, torch.cumsum((bins != 0).double(), 0)])
    blogb = torch.where(bins > 0, bins * torch.log(torch.where(bins > 0, bins, torch.ones_like(bins))),
                        torch.zeros_like(bins))
    cl = torch.cat([zero, torch.cumsum(blogb, 0)])
    total = cb[n]
    g = torch.arange(nq + 1, device=dev)
    bnd = torch.div(g[None, :] * cands[:, None] + nq - 1, nq, rounding_mode="floor")  # ceil(g * i / nq)
    mass = cb[bnd[:, 1:]] - cb[bnd[:, :-1]]
    cnt = cn[bnd[:, 1:]] - cn[bnd[:, :-1]]
    safe_cnt = cnt.clamp(min=1)
    safe_mass = torch.where(mass > 0, mass, torch.ones_like(mass))
    sum_log_q = torch.where(cnt > 0, mass * torch.log(safe_mass / safe_cnt), torch.zeros_like(mass)).sum(1)
    last = cands - 1
    b_last = bins[last]
    tail = total - cb[cands]
    g_last = torch.div(last * nq, cands, rounding_mode="floor").clamp(max=nq - 1)
    q_last = (mass.gather(1, g_last[:, None]) / safe_cnt.gather(1, g_last[:, None])).squeeze(1)
    has_tail = tail > 0
    sum_log_q = sum_log_q + torch.where(has_tail & (b_last > 0), tail * torch.log(torch.where(
        q_last > 0, q_last, torch.ones_like(q_last))), torch.zeros_like(tail))
    p_last = b_last + tail
    sum_log_p = cl[last] + torch.where(p_last > 0, p_last * torch.log(torch.where(
        p_last > 0, p_last, torch.ones_like(p_last))), torch.zeros_like(p_last))
    q_total = cb[cands]
    kl = (sum_log_p - sum_log_q) / total + torch.log(q_total / total)
    kl = torch.where(has_tail & (b_last == 0), torch.full_like(kl, math.inf), kl)
    kl = torch.where(q_total > 0, kl, torch.full_like(kl, math.nan))
    nan = torch.isnan(kl)
    if bool(nan.any()):  # numpy's argmin stops at the first NaN of the reversed list: the last NaN candidate
        return float(edges[int(cands[nan][-1])])
    best = float(kl.min())
    if not math.isfinite(best):
        return float(edges[int(cands[-1])])
    near = cands[kl <= best + 1e-7 * abs(best) + 1e-12]
    if near.numel() > 1:
        exact = _entropy_dense(bins, near, nq)
        m = exact.min()
        return float(edges[int(near[torch.nonzero(exact == m).flatten()[-1]])])
    return float(edges[int(near[-1])])
