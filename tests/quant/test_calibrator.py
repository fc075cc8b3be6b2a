"""trt_qat.quant.calibrator: the single-pass calibrator and amax searches equal pytorch-quantization's."""
import numpy as np
import pytest
import torch

from trt_qat.quant.calibrator import HistogramMaxCalibrator, amax_entropy, amax_mse, amax_percentile


def _reference_mse_cpu(calib_hist, calib_bin_edges, num_bits=8, unsigned=False, start_bin=128):
    """pytorch-quantization 2.1.3 ``_compute_amax_mse``'s loop, without its ``.cuda()`` calls."""
    from pytorch_quantization.tensor_quant import fake_tensor_quant

    counts = torch.from_numpy(calib_hist[:]).float()
    edges = torch.from_numpy(calib_bin_edges[:]).float()
    centers = (edges[1:] + edges[:-1]) / 2
    mses, arguments = [], []
    for i in range(start_bin, len(centers)):
        quant_centers = fake_tensor_quant(centers, centers[i], num_bits, unsigned)
        mses.append(((quant_centers - centers) ** 2 * counts).mean())
        arguments.append(i)
    return float(centers[arguments[int(np.argmin(mses))]])


def _reference_amax(ref_cal, method):
    if method == "mse":
        return _reference_mse_cpu(ref_cal._calib_hist.int().cpu().numpy(), ref_cal._calib_bin_edges.cpu().numpy())
    return float(ref_cal.compute_amax(method, percentile=99.9))


def _batches(kind, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        if kind == "silu":
            out.append(torch.nn.functional.silu(torch.randn(4, 8, 12, 12, generator=g) * (1 + 0.4 * b)))
        else:
            out.append(torch.relu(torch.randn(4, 8, 12, 12, generator=g)) ** 2 * (1 + 0.3 * b))
    return out


def test_first_batch_histogram_is_torch_histc():
    x = torch.nn.functional.silu(torch.randn(8, 16, 20, 20) * 3)
    cal = HistogramMaxCalibrator()
    cal.collect(x)
    top = float(x.abs().max())
    assert torch.equal(cal.hist, torch.histc(x.abs(), bins=2048, min=0, max=top).double())
    assert float(cal.amax) == top


@pytest.mark.parametrize("kind", ["silu", "relu2"])
@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_amax_matches_pytorch_quantization_histogram_calibrator(kind, method):
    from pytorch_quantization.calib import HistogramCalibrator

    ours, ref = HistogramMaxCalibrator(), HistogramCalibrator(8, None, False)
    for x in _batches(kind):
        ours.collect(x)
        ref.collect(x)
    a_ours = float(ours.compute_amax(method, percentile=99.9))
    a_ref = _reference_amax(ref, method)
    assert a_ours == pytest.approx(a_ref, rel=0.01)


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_search_picks_the_reference_bin_on_the_same_histogram(method):
    """Same histogram in, the vectorised searches choose the very bin the reference's loops choose."""
    from pytorch_quantization.calib import HistogramCalibrator

    for seed, kind in ((1, "silu"), (2, "relu2")):
        cal = HistogramMaxCalibrator(num_bins=512)
        for x in _batches(kind, seed=seed):
            cal.collect(x)
        ref = HistogramCalibrator(8, None, False)
        ref._calib_hist = cal.hist.float()
        ref._calib_bin_edges = cal.edges().float()
        ours = amax_mse(cal.hist, cal.edges()) if method == "mse" else amax_entropy(cal.hist, cal.edges())
        assert ours == pytest.approx(_reference_amax(ref, method), rel=1e-6)


def test_max_calibrator_on_a_known_tensor():
    cal = HistogramMaxCalibrator(collect_histogram=False)
    cal.collect(torch.tensor([[-3.5, 1.0], [2.0, 0.25]]))
    cal.collect(torch.tensor([1.0, -2.0]))
    assert float(cal.compute_amax("max")) == 3.5
    assert cal.hist is None
    with pytest.raises(ValueError):
        cal.compute_amax("percentile")


def test_percentile_of_a_uniform_sample():
    g = torch.Generator().manual_seed(6)
    cal = HistogramMaxCalibrator()
    for _ in range(4):
        cal.collect(torch.rand(200000, generator=g) * 10.0)
    assert float(cal.compute_amax("percentile", percentile=99.0)) == pytest.approx(9.9, rel=0.01)
    assert float(cal.compute_amax("percentile", percentile=50.0)) == pytest.approx(5.0, rel=0.01)
    edges = cal.edges()
    assert amax_percentile(cal.hist, edges, 100.0) == pytest.approx(float(cal.amax), rel=1e-3)


def test_histograms_with_one_width_merge_exactly():
    """Bins depend only on the width, so shards binned with a common width sum to the whole-data histogram."""
    data = _batches("silu", n=4, seed=7)
    whole = HistogramMaxCalibrator()
    for x in data:
        whole.collect(x)
    parts = []
    for shard in (data[0::2], data[1::2]):
        cal = HistogramMaxCalibrator()
        cal.width, cal.hist = whole.width, torch.zeros(whole.num_bins, dtype=torch.float64)
        for x in shard:
            cal.collect(x)
        parts.append(cal.hist)
    n = max(p.numel() for p in parts)
    merged = sum(torch.nn.functional.pad(p, (0, n - p.numel())) for p in parts)
    m = max(n, whole.hist.numel())
    # the whole-data first batch folds values equal to its max into the last initial bin, as histc does
    a = torch.nn.functional.pad(merged, (0, m - n))
    b = torch.nn.functional.pad(whole.hist, (0, m - whole.hist.numel()))
    assert a.sum() == b.sum()
    assert float((a - b).abs().sum()) <= 2.0
