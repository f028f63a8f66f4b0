"""Uncertainty of a table cell: a 95 % bootstrap interval over samples, the spread over purification draws,
and paired bootstrap differences between two defenses on the same samples.

Every metric of the harness is, at a fixed CIDEr idf, the mean of per-sample values (times a scale: 100
for CIDEr, VQA accuracy and top-1). VQA accuracy and top-1 are exactly that. Corpus CIDEr's idf depends on
the evaluated reference set; resampling with replacement makes that set ill-defined (duplicated images),
so the bootstrap keeps the idf of the evaluated subset fixed and resamples the per-sample CIDEr values
recorded with it. The point estimate is always the task's own corpus metric (from summary.json), and
``Cell`` checks that the mean of the per-sample values reproduces it, so the interval is centred on the
same number the run reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: bootstrap resamples and their seed (fixed, so a table is reproducible)
N_BOOT = 2000
SEED = 0


@dataclass
class Estimate:
    """A value with its 95 % bootstrap interval over samples."""

    value: float
    low: float
    high: float


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement; the same seed gives the same draws, so two defenses
    evaluated on the same samples are resampled identically (the paired bootstrap)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def interval(per_sample: np.ndarray, scale: float = 1.0, n_boot: int = N_BOOT, seed: int = SEED) -> Estimate:
    """Mean of ``per_sample`` (times ``scale``) and its 95 % percentile bootstrap interval."""
    x = np.asarray(per_sample, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("interval() needs a non-empty 1-d array of per-sample values")
    means = x[resample_indices(x.size, n_boot, seed)].mean(axis=1) * scale
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Estimate(float(x.mean() * scale), float(lo), float(hi))


def paired_difference(a: np.ndarray, b: np.ndarray, scale: float = 1.0, n_boot: int = N_BOOT,
                      seed: int = SEED) -> Estimate:
    """mean(a) - mean(b) over the same samples (aligned arrays), with the interval of a paired bootstrap:
    each resample picks the same samples for both, so the per-sample correlation is kept."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_difference needs aligned 1-d arrays, got {a.shape} and {b.shape}")
    return interval(a - b, scale, n_boot, seed)


def draws_view(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample values of a randomized defense, (n_samples, n_draws) -> the per-sample mean over draws
    (the table's "mean") and the per-sample worst draw (the table's "worst")."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        return {"mean": v}
    return {"mean": v.mean(axis=1), "worst": v.min(axis=1)}


def draw_spread(values: np.ndarray, scale: float = 1.0) -> float | None:
    """Standard deviation over purification draws of the per-draw metric (None with one draw)."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 1 or v.shape[1] < 2:
        return None
    return float(v.mean(axis=0).std(ddof=1) * scale)
