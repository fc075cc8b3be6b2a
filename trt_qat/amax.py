"""Statistics collection and amax computation for activation quantizers.

``HistogramMaxCalibrator`` collects, in one pass, both the running absolute maximum and a histogram of
absolute values (equal-width bins from 0, grown when a larger value arrives, as pytorch-quantization's
``HistogramCalibrator`` does). From that single pass any of the four methods can be computed:

- ``max``: the running absolute maximum;
- ``percentile``: the bin edge where the CDF reaches the percentile;
- ``mse``: the bin centre minimising the histogram-weighted quantization MSE;
- ``entropy``: the bin edge minimising the KL divergence (TensorRT's entropy calibration).

The mse and entropy searches are vectorised over all candidate bins at once, run on whatever device the
histogram lives on (CPU included; the reference implementation calls ``.cuda()`` for mse), and reproduce the
reference algorithms' choices.
"""
from __future__ import annotations

import math

import torch

__all__ = ["HistogramMaxCalibrator", "amax_percentile", "amax_mse", "amax_entropy"]


class HistogramMaxCalibrator:
    """Collects the absolute max and a histogram of |x| for a per-tensor activation quantizer.

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
        self.reset()

    def reset(self):
        self.amax = None  # running max of |x| (0-d tensor on the data's device)
        self.hist = None  # float64 counts
        self.width = None  # bin width (python float)

    @property
    def empty(self) -> bool:
        return self.amax is None

    @torch.no_grad()
    def collect(self, x: torch.Tensor):
        x = x.detach().float().abs()
        xmax = x.max()
        self.amax = xmax if self.amax is None else torch.maximum(self.amax, xmax)
        if not self.collect_histogram:
            return
        top = float(xmax)
        if self.hist is None:
            if top <= 0.0:
                top = 1e-8
            self.width = top / self.num_bins
            self.hist = torch.histc(x, bins=self.num_bins, min=0.0, max=top).double()
            return
        nbins = self.hist.numel()
        if top > nbins * self.width:
            nbins = int(math.ceil(top / self.width))
            grown = torch.zeros(nbins, dtype=self.hist.dtype, device=self.hist.device)
            grown[: self.hist.numel()] = self.hist
            self.hist = grown
        self.hist += torch.histc(x, bins=nbins, min=0.0, max=nbins * self.width).double()

    def edges(self) -> torch.Tensor:
        n = self.hist.numel()
        return torch.arange(n + 1, dtype=torch.float64, device=self.hist.device) * self.width

    def compute_amax(self, method: str = "max", percentile: float = 99.99, start_bin: int = 128) -> torch.Tensor | None:
        """Return amax (0-d float32 tensor on the CPU) for ``method``, or None when nothing was collected."""
        if self.amax is None:
            return None
        if method == "max":
            return self.amax.detach().float().cpu()
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


def amax_mse(hist, edges, num_bits=8, unsigned=False, start_bin=128, chunk=256) -> float:
    """Bin centre minimising sum(count * (fake_quant(centre) - centre)^2), searched over all candidates at once.

    Uses the same rounding as pytorch-quantization's ``fake_tensor_quant`` (round-half-even, bound 127 for
    signed INT8, values here are non-negative).
    """
    counts = hist.double()
    centers = (edges[1:] + edges[:-1]) / 2
    bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    n = centers.numel()
    if start_bin >= n:
        start_bin = 0
    best_val, best_idx = None, None
    for s in range(start_bin, n, chunk):
        cand = centers[s: s + chunk].float().double()
        amax = cand[:, None]
        scale = bound / amax
        q = torch.clamp(torch.round(centers[None, :].float().double() * scale), max=bound) / scale
        mse = ((q - centers[None, :]) ** 2 * counts[None, :]).mean(dim=1)
        v, i = torch.min(mse, dim=0)
        if best_val is None or v < best_val:
            best_val, best_idx = v, s + int(i)
    return float(centers[best_idx])


def amax_entropy(hist, edges, num_bits=8, unsigned=False, start_bin=128) -> float:
    """Bin edge minimising KL(reference || quantized) as TensorRT's entropy calibrator defines it.

    Vectorised over all candidate thresholds ``i`` in [start_bin, len(hist)]: for each, the first ``i`` bins are
    merged into ``2**(num_bits-1)`` groups, each group's mass is spread uniformly over its non-empty bins, and the
    outliers beyond ``i`` are folded into the last reference bin.
    """
    bins = hist.double().clone()
    if bins.numel() > 1:
        bins[0] = bins[1]
    nq = 1 << (num_bits - 1 + int(unsigned))
    n = bins.numel()
    dev = bins.device
    if start_bin > n:
        start_bin = n
    cands = torch.arange(start_bin, n + 1, device=dev)
    best_i, best_kl = None, None
    idx = torch.arange(n, device=dev, dtype=torch.float64)
    suffix = torch.flip(torch.cumsum(torch.flip(bins, [0]), 0), [0])  # suffix[j] = sum(bins[j:])
    suffix = torch.cat([suffix, torch.zeros(1, dtype=bins.dtype, device=dev)])
    chunk = max(1, (1 << 22) // max(n, 1))
    for s in range(0, cands.numel(), chunk):
        ci = cands[s: s + chunk]  # candidate thresholds
        c = ci.numel()
        valid = idx[None, :] < ci[:, None]  # [c, n] bins inside the threshold
        # group id of bin j for threshold i: np.digitize(j, linspace(0, i, nq + 1)) - 1
        gid = torch.div(idx.long()[None, :] * nq, ci[:, None], rounding_mode="floor").clamp(max=nq - 1)
        nonzero = valid & (bins[None, :] != 0)
        gid_eff = torch.where(nonzero, gid, torch.full_like(gid, nq))  # nq = dump bucket
        mass = torch.zeros(c, nq + 1, dtype=torch.float64, device=dev).scatter_add_(
            1, gid_eff, torch.where(nonzero, bins[None, :].expand(c, n), torch.zeros((), dtype=torch.float64,
                                                                                      device=dev)))
        cnt = torch.zeros(c, nq + 1, dtype=torch.float64, device=dev).scatter_add_(1, gid_eff, nonzero.double())
        per_bin = torch.where(cnt > 0, mass / cnt.clamp(min=1), torch.zeros_like(mass))
        q = torch.gather(per_bin, 1, gid_eff) * nonzero  # quantized density over the first i bins
        p = torch.where(valid, bins[None, :].expand(c, n), torch.zeros((), dtype=torch.float64, device=dev))
        last = (ci - 1).clamp(min=0)
        p = p.scatter_add(1, last[:, None], suffix[ci][:, None])
        p_sum = p.sum(1, keepdim=True)
        q_sum = q.sum(1, keepdim=True)
        p = p / torch.where(p_sum > 0, p_sum, torch.ones_like(p_sum))
        q = q / torch.where(q_sum > 0, q_sum, torch.ones_like(q_sum))
        # scipy.stats.entropy(p, q): sum p*log(p/q); inf where p>0 and q==0
        mask = p > 0
        ratio = torch.where(mask & (q > 0), p / torch.where(q > 0, q, torch.ones_like(q)), torch.ones_like(p))
        terms = torch.where(mask, p * torch.log(ratio), torch.zeros_like(p))
        kl = terms.sum(1)
        kl = torch.where((mask & (q <= 0)).any(1), torch.full_like(kl, float("inf")), kl)
        # the reference picks the LAST argmin
        m = kl.min()
        if best_kl is None or m <= best_kl:
            where = torch.nonzero(kl == m).flatten()
            if where.numel():
                best_kl, best_i = m, int(ci[where[-1]])
    return float(edges[best_i])
