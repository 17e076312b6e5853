"""The calibration math on distributions whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from alexnet_deploy.calibrators import (
    METHODS,
    HistogramCollector,
    NonFiniteActivation,
    kl_divergences,
    make_calibrator,
    mse_errors,
)
from alexnet_deploy.errors import UserError

N = 400_000
# two-sided 99.99th percentile of |x| for x ~ N(0, 1): Phi^-1(1 - 0.0001 / 2)
NORMAL_ABS_P9999 = 3.890592


def collect(*batches) -> HistogramCollector:
    hist = HistogramCollector()
    for batch in batches:
        hist.update(batch)
    return hist


def amaxes(hist: HistogramCollector) -> dict[str, float]:
    return {m: make_calibrator(m)(hist) for m in METHODS}


def int8_mse(x: np.ndarray, amax: float) -> float:
    """The actual mean squared error of symmetric int8 quantization of ``x`` at ``amax``."""
    x = x.astype(np.float64)
    s = amax / 127
    return float(np.mean((x - s * np.clip(np.round(x / s), -127, 127)) ** 2))


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20240501)


@pytest.fixture(scope="module")
def normal(rng):
    return rng.standard_normal(N).astype(np.float32)


# ---- the histogram ----

def test_histogram_counts_values_in_power_of_two_bins():
    hist = collect(np.array([0.0, 0.5, -0.5, 1.0, 2.99, -3.0], np.float32))
    assert hist.exponent == 2 and hist.range == 4.0          # smallest power of two above 3
    assert hist.bin_width == 4.0 / 2048
    expected = np.zeros(2048, np.int64)
    for v in (0.0, 0.5, 0.5, 1.0, 2.99, 3.0):
        expected[int(np.float32(v) / hist.bin_width)] += 1
    np.testing.assert_array_equal(hist.counts, expected)
    assert (hist.min, hist.max, hist.amax) == (-3.0, float(np.float32(2.99)), 3.0)
    assert (hist.count, hist.zeros) == (6, 1)


def test_a_power_of_two_value_opens_the_next_range():
    hist = collect(np.array([1.0], np.float32))
    assert hist.range == 2.0 and hist.counts[1024] == 1      # 1.0 is the bottom of bin 1024


def test_growing_merges_bins_exactly(rng):
    x = rng.uniform(0, 1, 10_000).astype(np.float32)
    hist = collect(x, np.array([3.5], np.float32))            # range 1 -> 4: groups of 4 merge
    direct = collect(np.concatenate([x, [3.5]]).astype(np.float32))
    np.testing.assert_array_equal(hist.counts, direct.counts)
    assert hist.exponent == direct.exponent == 2


def test_a_huge_jump_folds_everything_into_bin_zero():
    hist = collect(np.full(10, 1e-3, np.float32), np.array([1e6], np.float32))
    assert hist.counts[0] == 10 and hist.counts.sum() == 11


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_and_huge_magnitudes_stay_exact(dtype):
    for scale in (1e-38, 1e-30, 1e30, 3e38):
        x = (np.array([0.25, 0.5, 0.75, 0.99]) * scale).astype(dtype)
        hist = collect(x)
        assert hist.counts.sum() == 4 and hist.amax == pytest.approx(0.99 * scale, rel=1e-6)
        assert hist.range > hist.amax >= hist.range / 2


def test_results_do_not_depend_on_batch_size_or_order(rng):
    # magnitudes spanning 2**-3..2**9 force the range to grow many times when fed small-first
    x = (rng.standard_normal(60_000) * np.exp2(rng.integers(-3, 9, 60_000))).astype(np.float32)
    reference = collect(x)
    feeds = {
        "one batch": [x],
        "batches of 7": np.array_split(x, len(x) // 7),
        "ascending magnitude": np.array_split(x[np.argsort(np.abs(x))], 100),
        "descending magnitude": np.array_split(x[np.argsort(-np.abs(x))], 100),
        "shuffled": np.array_split(rng.permutation(x), 37),
    }
    expected = amaxes(reference)
    for name, batches in feeds.items():
        hist = collect(*batches)
        np.testing.assert_array_equal(hist.counts, reference.counts, err_msg=name)
        assert (hist.exponent, hist.min, hist.max, hist.zeros) == (
            reference.exponent, reference.min, reference.max, reference.zeros), name
        assert amaxes(hist) == expected, name


def test_merge_equals_collecting_everything(rng):
    small = rng.uniform(-1, 1, 5000).astype(np.float32)
    large = rng.uniform(-100, 100, 5000).astype(np.float32)
    zeros = np.zeros(10, np.float32)
    for parts in ([small, large], [large, small], [zeros, small], [small, zeros, large]):
        merged = HistogramCollector()
        for part in parts:
            merged.merge(collect(part))
        direct = collect(np.concatenate(parts))
        np.testing.assert_array_equal(merged.counts, direct.counts)
        assert (merged.exponent, merged.count, merged.zeros, merged.amax) == (
            direct.exponent, direct.count, direct.zeros, direct.amax)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_and_not_counted(bad):
    hist = collect(np.ones(4, np.float32))
    with pytest.raises(NonFiniteActivation):
        hist.update(np.array([1.0, bad, 2.0], np.float32))
    assert hist.count == 4 and hist.counts.sum() == 4 and hist.amax == 1.0


def test_all_zeros_gives_amax_zero_from_every_method():
    hist = collect(np.zeros((2, 3, 4), np.float32), np.zeros(0, np.float32))
    assert hist.exponent is None and hist.amax == 0.0 and hist.zeros == 24
    assert amaxes(hist) == {m: 0.0 for m in METHODS}
    assert amaxes(HistogramCollector()) == {m: 0.0 for m in METHODS}


def test_bounded_memory():
    hist = HistogramCollector()
    for _ in range(3):
        hist.update(np.random.default_rng(0).standard_normal((8, 64, 16, 16)).astype(np.float32))
    assert hist.counts.shape == (2048,) and hist.counts.sum() == 3 * 8 * 64 * 16 * 16


# ---- calibrators on known distributions ----

def test_uniform_every_method_keeps_about_the_max(rng):
    x = rng.uniform(-3, 3, N).astype(np.float32)
    hist = collect(x)
    for method, amax in amaxes(hist).items():
        assert 0.99 * hist.amax <= amax <= hist.amax, method


def test_normal_clipping_methods_clip_inside_the_max(normal):
    hist = collect(normal)
    got = amaxes(hist)
    assert got["minmax"] == hist.amax > 4.3
    # the sample's own percentile to within a bin; the analytic one to within sampling error
    # (40 samples lie beyond it: its standard error is about 0.04)
    exact = np.percentile(np.abs(normal), 99.99)
    assert got["percentile"] == pytest.approx(exact, abs=hist.bin_width)
    assert got["percentile"] == pytest.approx(NORMAL_ABS_P9999, abs=0.15)
    # MSE-optimal clipping of a unit normal at 8 bits is about 3.9 (Banner et al., ACIQ)
    assert got["mse"] == pytest.approx(3.9, abs=0.25)
    for method in ("percentile", "mse"):
        assert got[method] < 0.9 * hist.amax, method


def test_normal_entropy_clips_inside_the_max_given_enough_samples():
    # KL(P||Q) weighs the outliers folded into the last bin against the sampling noise that
    # merging bins into 128 levels averages away; the noise term shrinks as samples grow, so a
    # normal is clipped only when the tail is well sampled (at 400k samples it is not clipped).
    x = np.random.default_rng(1).standard_normal(2_000_000).astype(np.float32)
    hist = collect(x)
    assert 4.0 < make_calibrator("entropy")(hist) < 0.95 * hist.amax


def test_percentile_follows_its_option(normal):
    hist = collect(normal)
    # 99th percentile of |x|: Phi^-1(0.995) = 2.5758; 50th: Phi^-1(0.75) = 0.6745
    assert make_calibrator("percentile", percentile=99.0)(hist) == pytest.approx(2.5758, abs=0.02)
    assert make_calibrator("percentile", percentile=50.0)(hist) == pytest.approx(0.6745, abs=0.01)
    assert make_calibrator("percentile", percentile=100.0)(hist) == pytest.approx(hist.amax,
                                                                                  rel=1e-3)


def test_rare_large_outliers_are_clipped_except_by_minmax(normal):
    x = np.concatenate([normal, [60.0, -90.0, 75.0]]).astype(np.float32)
    got = amaxes(collect(x))
    assert got["minmax"] == 90.0
    assert got["percentile"] == pytest.approx(np.percentile(np.abs(x), 99.99),
                                              abs=collect(x).bin_width)
    assert got["percentile"] < 4.2
    # 128 kept bins of a [0, 128) histogram is 8.0: the smallest threshold entropy can choose
    assert got["entropy"] <= 8.0
    assert got["mse"] < 45.0
    assert int8_mse(x, got["mse"]) < 0.5 * int8_mse(x, got["minmax"])


def test_relu_half_normal(normal):
    x = np.maximum(normal, 0)
    hist = collect(x)
    got = amaxes(hist)
    assert hist.zeros == np.count_nonzero(x == 0) > 0.45 * N
    # P(|x| <= t) = Phi(t) for the ReLU'd normal: the 99.99th percentile is Phi^-1(0.9999)
    assert got["percentile"] == pytest.approx(np.percentile(x, 99.99), abs=hist.bin_width)
    assert got["percentile"] == pytest.approx(3.719, abs=0.15)
    # zeros quantize exactly, so clipping and rounding costs both halve: same optimum as N(0, 1)
    assert got["mse"] == pytest.approx(3.9, abs=0.35)
    assert 3.5 < got["entropy"] <= hist.amax
    # why entropy leaves exact zeros out: counted, the spike collapses the threshold
    assert make_calibrator("entropy", skip_zeros=False)(hist) < 2.1


@pytest.mark.parametrize("shape", ["normal", "relu", "laplace", "outliers"])
def test_mse_threshold_is_the_empirical_optimum(rng, shape):
    x = {"normal": rng.standard_normal(N), "relu": np.maximum(rng.standard_normal(N), 0),
         "laplace": rng.laplace(size=N),
         "outliers": np.concatenate([rng.standard_normal(N), [40.0, -50.0]])}[shape]
    x = x.astype(np.float32)
    hist = collect(x)
    chosen = make_calibrator("mse")(hist)
    grid = np.linspace(0.2, 1.0, 161) * hist.amax
    best = min(int8_mse(x, t) for t in grid)
    assert int8_mse(x, chosen) <= 1.002 * best
    # the model of the error (uniform inside bins, exact zeros) predicts the measured error
    counts = hist.counts.astype(np.float64)
    counts[0] -= hist.zeros
    k = chosen / hist.bin_width
    predicted = mse_errors(counts, np.array([k]))[0] * hist.bin_width ** 2 / x.size
    assert predicted == pytest.approx(int8_mse(x, chosen), rel=0.01)


def test_mse_coarse_to_fine_search_finds_the_full_search_optimum(rng):
    for x in (rng.standard_normal(N), rng.laplace(size=N), rng.gamma(0.5, size=N)):
        hist = collect(x.astype(np.float32))
        counts = hist.counts.astype(np.float64)
        counts[0] -= hist.zeros
        every = np.arange(1, np.flatnonzero(counts)[-1] + 2)
        full = every[np.argmin(mse_errors(counts, every))] * hist.bin_width
        assert make_calibrator("mse")(hist) == min(full, hist.amax)


def _kl_by_definition(counts, num_levels, start_bin, eps=1e-4):
    """KL(P||Q) built bin by bin, following the published description step by step."""
    counts = np.asarray(counts, np.float64)
    out = []
    for i in range(start_bin, counts.size + 1):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()                       # outliers folded into the last bin
        group = np.arange(i) * num_levels // i
        q = np.zeros(i)
        for j in range(num_levels):
            members = group == j
            nonempty = members & (counts[:i] > 0)
            if nonempty.any():
                q[nonempty] = counts[:i][members].sum() / nonempty.sum()
        if q.sum() == 0:
            out.append(np.inf)
            continue
        q_smoothed = np.where((q == 0) & (p > 0), eps, q)
        P, Q = p / p.sum(), q_smoothed / q.sum()
        m = P > 0
        out.append(float(np.sum(P[m] * np.log(P[m] / Q[m]))))
    return np.array(out)


def test_entropy_divergence_matches_the_definition(rng):
    for trial in range(4):
        counts = rng.poisson(rng.uniform(0, 6, 512)) * (rng.uniform(size=512) > 0.3)
        counts[300 + 20 * trial:] = 0
        counts[450] = 2                                  # a lone outlier beyond empty bins
        kept, fast = kl_divergences(counts, num_levels=32, start_bin=32)
        slow = _kl_by_definition(counts, 32, 32)
        assert kept[0] == 32 and kept[-1] == 512
        np.testing.assert_array_equal(np.isinf(fast), np.isinf(slow))
        finite = np.isfinite(slow)
        np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-12)
        assert np.argmin(fast) == np.argmin(slow)


def test_entropy_prefers_no_clipping_when_nothing_sticks_out():
    # a flat histogram over bins 0..999: any threshold below it loses mass into one spike
    counts = np.zeros(2048)
    counts[:1000] = 100
    kept, divergence = kl_divergences(counts)
    assert kept[np.argmin(divergence)] >= 1000


def test_entropy_of_a_constant_tensor_is_the_constant():
    assert make_calibrator("entropy")(collect(np.full(1000, 0.3, np.float32))) == pytest.approx(
        float(np.float32(0.3)))


# ---- the factory ----

def test_make_calibrator_options_and_errors():
    assert make_calibrator("percentile").options() == {"percentile": 99.99}
    assert make_calibrator("percentile", percentile=99.9).percentile == 99.9
    assert make_calibrator("minmax").options() == {}
    assert make_calibrator("entropy").options()["num_levels"] == 128
    with pytest.raises(UserError, match="unknown calibration method 'kl'"):
        make_calibrator("kl")
    with pytest.raises(UserError, match="does not take options"):
        make_calibrator("minmax", percentile=99.0)
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(UserError, match="percentile must be in"):
            make_calibrator("percentile", percentile=bad)
