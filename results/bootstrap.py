"""Paired percentile-bootstrap confidence intervals over cases.

The unit of resampling is the case: per (model, benchmark, split, scenario, T, B, protocol) group, every
method's per-case values are laid out over the same case list, and one matrix of resampled case
indices (``numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))``) serves every method
and metric of the group, so a difference between two methods is a paired comparison.  A case scored
under several seeds enters with its mean over seeds.  For each resample a metric's mean is taken over
the resampled cases that have the metric (NaN-aware), and Avg. is the mean of the metric means that
count in the average, exactly as the tables compute Avg.; the interval is the 2.5th-97.5th percentile
(``numpy.percentile``, linear interpolation) of the resampled statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from kebench.core import metrics as metric_registry
from kebench.core.errors import KebenchError

AVG = "avg"
#: more resamples than this do not move a 95% percentile interval in its second decimal; the cap turns a
#: typo (10**7) into a one-line error instead of gigabytes of index matrices (issue 31)
MAX_RESAMPLES = 100_000
#: resamples x cases of one group held at once: the index matrix and its gathered values take about
#: 30 bytes per resampled case (measured with two methods and two metrics), so about 0.6 GB
MAX_RESAMPLED_CASES = 20_000_000


def check_resamples(resamples: int, cases: int | None = None) -> None:
    """A one-line error for a resample count outside 1..MAX_RESAMPLES, or one whose index matrix over a
    group of ``cases`` cases would exceed MAX_RESAMPLED_CASES."""
    if not isinstance(resamples, int) or isinstance(resamples, bool) or not 1 <= resamples <= MAX_RESAMPLES:
        raise KebenchError(f"--resamples must be an integer in 1..{MAX_RESAMPLES:,}, got {resamples!r}")
    if cases is not None and resamples * cases > MAX_RESAMPLED_CASES:
        most = MAX_RESAMPLED_CASES // cases
        raise KebenchError(f"--resamples {resamples:,} over a group of {cases:,} cases would hold "
                           f"{resamples * cases:,} resampled cases in memory (at most {MAX_RESAMPLED_CASES:,}); "
                           f"use --resamples {most:,} or fewer")


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    def overlaps(self, other: "Estimate") -> bool:
        return self.low <= other.high and other.low <= self.high


def resample_indices(n_cases: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n_cases] case indices drawn with replacement; one matrix per group."""
    return np.random.default_rng(seed).integers(0, n_cases, size=(resamples, n_cases))


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where a row has no value (no warning)."""
    present = ~np.isnan(values)
    counts = present.sum(axis=-1)
    sums = np.where(present, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _interval(samples: np.ndarray, point: float) -> Estimate:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return Estimate(point, point, point)
    low, high = np.percentile(samples, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high))


def bootstrap_group(per_method: Mapping[str, Mapping[str, Sequence[float]]], indices: np.ndarray) -> dict[str, dict[str, Estimate]]:
    """``per_method[label][metric]`` holds one value per case of the group (NaN where the case lacks the
    metric), all over the same case order; returns ``[label][metric or "avg"] -> Estimate``."""
    out: dict[str, dict[str, Estimate]] = {}
    for label, by_metric in per_method.items():
        estimates: dict[str, Estimate] = {}
        point_means: dict[str, float] = {}
        sample_means: dict[str, np.ndarray] = {}
        for metric, values in by_metric.items():
            vector = np.asarray(values, dtype=np.float64)
            if np.isnan(vector).all():
                continue
            point_means[metric] = float(np.nanmean(vector))
            sample_means[metric] = _nanmean_rows(vector[indices])
            estimates[metric] = _interval(sample_means[metric], point_means[metric])
        counted = [m for m in point_means if metric_registry.counts_in_average(m)]
        if counted:
            point = float(np.mean([point_means[m] for m in counted]))
            stacked = np.stack([sample_means[m] for m in counted], axis=-1)
            estimates[AVG] = _interval(_nanmean_rows(stacked), point)
        out[label] = estimates
    return out
