"""The calibration math: streaming histograms of activations and the calibrators that read them.

Numpy only. A :class:`HistogramCollector` holds, per tensor, a 2048-bin histogram of ``|x|`` over
``[0, 2**e)`` plus the running min/max; memory stays constant however many images go through.
A calibrator maps that histogram to ``amax``, the magnitude that symmetric int8 maps to 127
(scale ``amax / 127``, zero point 0):

===============  ================================================================================
``minmax``       ``max |x|`` (exact, from the running min/max)
``percentile``   the ``p``-th percentile of ``|x|`` (default 99.99), interpolated inside its bin
``entropy``      TensorRT's KL-divergence method (Migacz, "8-bit Inference with TensorRT", 2017)
``mse``          the threshold minimizing the expected squared int8 quantization error
===============  ================================================================================

Why the histogram range is a power of two: when a batch exceeds the current range, the range
doubles until it fits and every pair of adjacent bins merges into one. Bin edges are then
``k * 2**(e - 11)``, exact in floating point, so a value lands in the same final bin whichever
range it was first counted under: the histogram, and every ``amax``, is *identical* whatever the
batch size or batch order (no merge rounding at all). The price is resolution: the data may
occupy only the lower half of the bins (between 1024 and 2048 of them).

All-zero tensors: every calibrator returns ``amax = 0.0`` for a histogram with no nonzero value;
choosing a usable scale for such a tensor is the caller's decision (see
:mod:`alexnet_deploy.calibrate`). For any tensor with a nonzero value, every calibrator returns
``0 < amax <= max |x|``.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from alexnet_deploy.errors import UserError

#: the largest magnitude of a symmetric int8 code; a tensor's scale is ``amax / INT8_MAX``
INT8_MAX = 127

NUM_BINS = 2048
_CHUNK = 1 << 16  # elements histogrammed at a time: the temporaries stay in L2 cache
_local = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    """This thread's reusable ``float32`` and ``intp`` buffers of ``_CHUNK`` elements."""
    if not hasattr(_local, "buffers"):
        _local.buffers = (np.empty(_CHUNK, np.float32), np.empty(_CHUNK, np.intp))
    return _local.buffers


class NonFiniteActivation(ValueError):
    """An activation batch held NaN or +-Inf; calibration cannot represent it."""


class HistogramCollector:
    """Streaming histogram of ``|x|`` with a power-of-two range, plus running statistics.

    Args:
        num_bins: bins over ``[0, range)``; a power of two so that doubling the range merges
            bins exactly. Defaults to 2048 (TensorRT's entropy calibration uses 2048).

    Attributes:
        counts: ``int64[num_bins]``; bin ``b`` counts ``b * bin_width <= |x| < (b+1) * bin_width``.
        exponent: the range is ``2**exponent``, the smallest power of two above every ``|x|``
            seen; None until a nonzero value has been seen.
        min, max: the smallest and largest value seen (signed).
        count: values seen. zeros: of those, exactly zero (bin 0 holds them too).
    """

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        if num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins}")
        self.num_bins = num_bins
        self._log2_bins = num_bins.bit_length() - 1
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.exponent: int | None = None
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.zeros = 0

    @property
    def range(self) -> float:
        """Upper end of the histogram, ``2**exponent`` (0.0 before any nonzero value)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def bin_width(self) -> float:
        return self.range / self.num_bins

    @property
    def amax(self) -> float:
        """``max |x|`` over everything seen (0.0 when nothing, or only zeros, was seen)."""
        return max(-self.min, self.max, 0.0) if self.count else 0.0

    def update(self, x: np.ndarray) -> None:
        """Add every element of ``x`` (any shape, float) to the histogram.

        Raises:
            NonFiniteActivation: ``x`` holds NaN or +-Inf (nothing is added).
        """
        x = np.asarray(x)
        if x.size == 0:
            return
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())  # NaN propagates into both; Inf shows up in one
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteActivation(f"min {lo}, max {hi}")
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.size
        amax = max(-lo, hi)
        if amax == 0.0:
            self.counts[0] += x.size
            self.zeros += x.size
            return
        # frexp: amax = m * 2**e with 0.5 <= m < 1, so 2**e is the smallest power of two > amax
        exponent = math.frexp(amax)[1]
        if self.exponent is None:
            self.exponent = exponent
        elif exponent > self.exponent:
            self._grow(exponent)
        shift = self._log2_bins - self.exponent
        flat = x.ravel()
        if x.dtype == np.float32 and -126 <= shift <= 127:
            self._count_float32(flat, np.float32(math.ldexp(1.0, shift)))
        else:  # float64, or a factor float32 cannot hold: exact in float64 too
            scaled = np.abs(flat.astype(np.float64)) * math.ldexp(1.0, shift)
            self.zeros += int(np.count_nonzero(scaled == 0.0))
            self.counts += np.bincount(scaled.astype(np.intp), minlength=self.num_bins)

    def _count_float32(self, flat: np.ndarray, factor: np.float32) -> None:
        # In cache-sized chunks through reused buffers: about 4x faster than whole-tensor
        # temporaries, which cost a page fault per 4 KiB on every batch.
        magnitude, index = _scratch()
        zeros = 0
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start:start + _CHUNK]
            m, i = magnitude[: chunk.size], index[: chunk.size]
            np.abs(chunk, out=m)
            zeros += chunk.size - np.count_nonzero(m.view(np.int32))  # +0.0 is all-zero bits
            m *= factor                     # |x| * 2**shift < num_bins, exact (power of two)
            np.copyto(i, m, casting="unsafe")  # truncation is floor for non-negative values
            self.counts += np.bincount(i, minlength=self.num_bins)
        self.zeros += zeros

    def _grow(self, exponent: int) -> None:
        """Widen the range to ``2**exponent``, merging each group of ``2**d`` bins into one."""
        d = exponent - self.exponent
        merged = np.zeros_like(self.counts)
        if d >= self._log2_bins:
            merged[0] = self.counts.sum()
        else:
            merged[: self.num_bins >> d] = self.counts.reshape(-1, 1 << d).sum(axis=1)
        self.counts, self.exponent = merged, exponent

    def merge(self, other: HistogramCollector) -> None:
        """Add ``other``'s values to this histogram, as if they had been ``update``-d here."""
        if other.num_bins != self.num_bins:
            raise ValueError("cannot merge histograms with different bin counts")
        if other.count == 0:
            return
        counts = other.counts
        if other.exponent is not None:
            if self.exponent is None:
                self.exponent = other.exponent  # only zeros so far, all in bin 0 at any range
            elif other.exponent > self.exponent:
                self._grow(other.exponent)
            elif other.exponent < self.exponent:
                wider = HistogramCollector(self.num_bins)
                wider.counts, wider.exponent = counts.copy(), other.exponent
                wider._grow(self.exponent)
                counts = wider.counts
        self.counts = self.counts + counts
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        self.zeros += other.zeros


# ---- calibrators: HistogramCollector -> amax ----


class Calibrator:
    """Base class: ``calibrator(collector) -> amax``; ``options()`` for the calibration file."""

    method: ClassVar[str]

    def __call__(self, hist: HistogramCollector) -> float:
        if hist.amax == 0.0:
            return 0.0
        return float(min(self.amax(hist), hist.amax))

    def amax(self, hist: HistogramCollector) -> float:
        raise NotImplementedError

    def options(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MinMaxCalibrator(Calibrator):
    """``amax = max |x|``: nothing is clipped; outliers stretch the scale."""

    method: ClassVar[str] = "minmax"

    def amax(self, hist: HistogramCollector) -> float:
        return hist.amax


@dataclass(frozen=True)
class PercentileCalibrator(Calibrator):
    """The ``percentile``-th percentile of ``|x|``, interpolated linearly inside its bin.

    Args:
        percentile: in (0, 100]. Defaults to 99.99.
    """

    method: ClassVar[str] = "percentile"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise UserError(f"--percentile must be in (0, 100], got {self.percentile}")

    def amax(self, hist: HistogramCollector) -> float:
        cdf = np.cumsum(hist.counts)
        target = self.percentile / 100.0 * cdf[-1]
        b = min(int(np.searchsorted(cdf, target, side="left")), hist.num_bins - 1)
        below = cdf[b - 1] if b else 0
        fraction = (target - below) / hist.counts[b]
        return (b + fraction) * hist.bin_width


@dataclass(frozen=True)
class EntropyCalibrator(Calibrator):
    """TensorRT's entropy calibration: the clipping threshold whose int8 version of the histogram
    loses the least information, measured by KL(P || Q).

    For every candidate ``i`` in ``start_bin..num_bins`` (kept bins): P is the first ``i`` bins
    with all the mass beyond them (the outliers, clipped to the threshold) added to bin ``i-1``;
    Q is the first ``i`` bins merged into ``num_levels`` equal groups (group ``j`` holds bins
    ``b`` with ``floor(b * num_levels / i) == j``), each group's mass spread evenly over the bins
    of the group that were nonempty (empty bins stay empty). The threshold is ``i * bin_width``,
    the top of the kept bins, for the ``i`` of least divergence (the smallest on ties).

    Smoothing: Q can be empty where P is not only in bin ``i-1``, when that bin was empty before
    the outliers were folded into it; there Q gets ``eps`` of one count (as MXNet's and TVM's KL
    calibrators smooth raw counts), which keeps the divergence finite but large. Elsewhere P and
    Q are empty in the same bins, and the usual smoothing's shift of ``eps`` between the two is
    left out: it is below 1e-4 of a count. This makes the divergence a sum over the
    ``num_levels`` groups, computed from prefix sums for all candidates at once.

    Exact zeros are left out of the histogram by default. They quantize without error at any
    scale, and a ReLU output is often half zeros: counted, that spike in bin 0 is spread over
    the whole first group of Q, which costs about ``(zero fraction) * log(bins per group)`` and
    drives the threshold down to the first few multiples of 128 bins whatever the rest of the
    distribution looks like (for a ReLU'd unit normal, about 2 instead of 4 to 5; see
    ``tests/test_calibrators.py``). Int8 tools built on the same method (ncnn,
    caffe-int8-convert-tools) drop the zeros for this reason.

    Args:
        num_levels: quantized levels of the positive half. Defaults to 128 (TensorRT).
        start_bin: the smallest number of kept bins tried. Defaults to 128 (TensorRT).
        eps: smoothing mass, in counts. Defaults to 1e-4.
        skip_zeros: leave exact zeros out of P and Q. Defaults to True.
    """

    method: ClassVar[str] = "entropy"
    num_levels: int = 128
    start_bin: int = 128
    eps: float = 1e-4
    skip_zeros: bool = True

    def amax(self, hist: HistogramCollector) -> float:
        counts = hist.counts.copy()
        if self.skip_zeros:
            counts[0] -= hist.zeros
        kept, divergence = kl_divergences(counts, self.num_levels, self.start_bin, self.eps)
        return int(kept[np.argmin(divergence)]) * hist.bin_width


def _xlogx(v: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


@functools.lru_cache(maxsize=8)
def _group_edges(num_bins: int, num_levels: int, start_bin: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``i = start_bin..num_bins`` and, per candidate, the ``num_levels + 1`` bin
    edges of its groups: group ``j`` is bins ``ceil(j*i/L) .. ceil((j+1)*i/L) - 1``."""
    kept = np.arange(start_bin, num_bins + 1)
    edges = -(-np.outer(kept, np.arange(num_levels + 1)) // num_levels)
    kept.flags.writeable = edges.flags.writeable = False
    return kept, edges


def kl_divergences(counts: np.ndarray, num_levels: int = 128, start_bin: int = 128,
                   eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of :class:`EntropyCalibrator` for every candidate number of kept bins.

    Returns ``(kept, divergence)``: ``kept`` is ``start_bin..len(counts)``; ``divergence[c]``
    is inf where nothing at all falls below the threshold.

    With ``T`` the total count, ``Qt`` the count below the threshold and ``p_b``, ``q_b``
    unnormalized, ``KL = (sum p log p - sum p log q) / T - log T + log Qt``; inside group ``j``
    every nonempty ``q_b`` equals ``S_j / n_j`` (group sum over nonempty bins), so
    ``sum p log q`` is ``sum_j S_j log(S_j / n_j)`` plus the outliers' term in the last bin.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.size
    if not 1 <= num_levels <= start_bin <= n:
        raise ValueError(f"need 1 <= num_levels ({num_levels}) <= start_bin ({start_bin}) "
                         f"<= bins ({n})")
    total = counts.sum()
    prefix = np.concatenate(([0.0], np.cumsum(counts)))
    nonempty = np.concatenate(([0], np.cumsum(counts > 0)))
    plogp_prefix = np.concatenate(([0.0], np.cumsum(_xlogx(counts))))

    kept, edges = _group_edges(n, num_levels, start_bin)
    below = prefix[kept]                      # Qt: the mass the threshold keeps
    outliers = total - below
    last = counts[kept - 1]
    group_sum = np.diff(prefix[edges], axis=1)
    group_nonempty = np.diff(nonempty[edges], axis=1)
    filled = group_sum > 0                    # then group_nonempty > 0 too
    log_level = np.zeros_like(group_sum)      # log of Q's value in a group's nonempty bins
    np.log(group_sum, out=log_level, where=filled)
    log_level -= np.log(np.maximum(group_nonempty, 1))
    cross = np.einsum("ij,ij->i", group_sum, log_level)
    # the outliers sit in bin i-1: Q there is the last group's level, or eps if it was empty
    log_q_last = np.where(last > 0, log_level[:, -1], math.log(eps))
    cross += np.where(outliers > 0, outliers * log_q_last, 0.0)
    plogp = plogp_prefix[kept - 1] + _xlogx(last + outliers)
    with np.errstate(divide="ignore"):
        divergence = (plogp - cross) / total - math.log(total) + np.log(below)
    divergence[below <= 0] = np.inf
    return kept, divergence


@dataclass(frozen=True)
class MseCalibrator(Calibrator):
    """The threshold ``t`` minimizing the expected squared error of symmetric int8 quantization,
    ``x -> s * clip(round(x / s), -L, L)`` with ``s = t / L``, over the histogram.

    Values are taken as uniform inside their bin, except exact zeros (counted apart), which
    quantize without error. A value below ``t`` costs its rounding error, computed exactly for a
    uniform bin; a value above costs ``(x - t)**2``. Candidates are bin edges up to the first one
    above ``max |x|``: every ``stride``-th first, then every edge within ``stride`` of the best
    (the error is a smooth function of ``t``; the test suite checks this against every edge).

    Args:
        levels: positive int8 levels. Defaults to 127.
        stride: bins between the first round's candidates. Defaults to 16.
    """

    method: ClassVar[str] = "mse"
    levels: int = 127
    stride: int = 16

    def amax(self, hist: HistogramCollector) -> float:
        counts = hist.counts.astype(np.float64)
        counts[0] -= hist.zeros
        top = int(np.flatnonzero(counts)[-1]) + 1
        coarse = np.unique(np.append(np.arange(self.stride, top + 1, self.stride), top))
        best = coarse[np.argmin(mse_errors(counts, coarse, self.levels))]
        fine = np.arange(max(1, best - self.stride + 1), min(top, best + self.stride - 1) + 1)
        return int(fine[np.argmin(mse_errors(counts, fine, self.levels))]) * hist.bin_width


def _rounding_integral(u: np.ndarray) -> np.ndarray:
    """``G(u) = integral_0^u (v - round(v))**2 dv`` (for u >= 0): ``M/12 + r**3/3``."""
    m = np.floor(u + 0.5)
    r = u - m
    return m / 12.0 + r * r * r / 3.0


def mse_errors(counts: np.ndarray, thresholds: np.ndarray, levels: int = 127) -> np.ndarray:
    """Expected squared int8 error, in ``bin_width**2`` units, of clipping ``counts`` (values
    uniform inside each bin; leave exact zeros out) at ``thresholds * bin_width``."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.size
    b = np.arange(n, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    k = np.asarray(thresholds, dtype=np.intp)

    # clipping: bins b >= k hold x ~ U[b, b+1) (bin units); E[(x - t)^2] = m2 - 2 t m1 + t^2
    def suffix(v):
        return np.concatenate((np.cumsum(v[::-1])[::-1], [0.0]))

    s0, s1, s2 = suffix(c), suffix(c * (b + 0.5)), suffix(c * (b * b + b + 1.0 / 3.0))
    error = s2[k] - 2.0 * t * s1[k] + t * t * s0[k]

    # rounding, bins b < k: step s = t / levels, u = x / s; mean error s^3 * (G(u_hi) - G(u_lo))
    top = int(k.max())
    step = (t / levels)[:, None]
    g = _rounding_integral(np.arange(top + 1, dtype=np.float64)[None, :] / step)
    per_bin = step ** 3 * np.diff(g, axis=1)
    per_bin *= b[None, :top] < t[:, None]
    return error + per_bin @ c[:top]


CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.method: cls for cls in
    (EntropyCalibrator, PercentileCalibrator, MinMaxCalibrator, MseCalibrator)
}
METHODS = tuple(CALIBRATORS)


def make_calibrator(method: str, **options) -> Calibrator:
    """The calibrator named ``method`` (one of :data:`METHODS`) with ``options``.

    ``make_calibrator("percentile", percentile=99.9)``; options left out take the documented
    defaults. UserError for an unknown method or an option the method does not take.
    """
    if method not in CALIBRATORS:
        raise UserError(f"unknown calibration method {method!r}: expected one of "
                        f"{', '.join(METHODS)}")
    try:
        return CALIBRATORS[method](**options)
    except TypeError as e:
        raise UserError(f"calibration method {method!r} does not take options "
                        f"{sorted(options)} ({e})") from e
