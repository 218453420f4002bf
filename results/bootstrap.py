"""Paired percentile-bootstrap confidence intervals over cases, and over seeds then cases (hierarchical).

The unit of resampling is the case, and with several seeds the seed first: per (model, benchmark, split,
scenario, T, B, protocol) group, every method's values are laid out as a [seeds, cases] matrix over the same
seed list and case list, and one set of draws serves every method and metric of the group, so a difference
between two methods is a paired comparison.  Resample r puts ``seeds[r, j]`` (drawn with replacement from
the group's S seeds) into slot j and fills that slot with the cases ``cases[r, j, :]`` (n drawn with
replacement from the n cases); its statistic is the mean over slots of the slot's mean over its cases.
``hierarchical_draws`` draws ``cases`` first, as ``numpy.random.default_rng(seed).integers(0, n, size=(R, S,
n))``, then ``seeds`` from the same generator, ``integers(0, S, size=(R, S))``; with one seed the case draws are
exactly the one-level bootstrap's ``integers(0, n, size=(R, n))``, so single-seed intervals are unchanged.

Point values: a metric's mean is the mean over seeds of its per-seed mean over cases; ``sd`` is the sample
standard deviation (ddof 1) of those per-seed means (None with one seed).  All means are NaN-aware (a case
or seed without the metric is left out).  Avg. is the mean of the metric means that count in the average,
exactly as the tables compute Avg., per resample and per seed alike; the interval is the 2.5th-97.5th
percentile (``numpy.percentile``, linear interpolation) of the resampled statistics.
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
    #: the sample sd over seeds of the per-seed means; None with fewer than two seeds
    sd: float | None = None
    seeds: int = 1  # the seeds the mean is taken over

    def overlaps(self, other: "Estimate") -> bool:
        return self.low <= other.high and other.low <= self.high


def resample_indices(n_cases: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n_cases] case indices drawn with replacement; one matrix per group."""
    return np.random.default_rng(seed).integers(0, n_cases, size=(resamples, n_cases))


@dataclass(frozen=True)
class Draws:
    """One group's resamples: ``seeds[r, j]`` is the seed (an index into the group's seeds) in slot j of resample
    r, ``cases[r, j, k]`` the case (an index into its cases) in place k of that slot."""

    seeds: np.ndarray  # [resamples, S]
    cases: np.ndarray  # [resamples, S, n]


def hierarchical_draws(n_seeds: int, n_cases: int, resamples: int, seed: int) -> Draws:
    """Seeds, then cases within them, drawn with replacement (see the module docstring for the order)."""
    rng = np.random.default_rng(seed)
    cases = rng.integers(0, n_cases, size=(resamples, n_seeds, n_cases))
    seeds = (rng.integers(0, n_seeds, size=(resamples, n_seeds)) if n_seeds > 1
             else np.zeros((resamples, 1), dtype=np.int64))
    return Draws(seeds, cases)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where a row has no value (no warning)."""
    present = ~np.isnan(values)
    counts = present.sum(axis=-1)
    sums = np.where(present, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def seed_sd(per_seed: np.ndarray) -> float | None:
    """The sample sd (ddof 1) of the per-seed values that exist; None with fewer than two."""
    present = per_seed[~np.isnan(per_seed)]
    return float(np.std(present, ddof=1)) if present.size > 1 else None


def _interval(samples: np.ndarray, point: float, per_seed: np.ndarray) -> Estimate:
    seeds = int((~np.isnan(per_seed)).sum())
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return Estimate(point, point, point, seed_sd(per_seed), seeds)
    low, high = np.percentile(samples, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high), seed_sd(per_seed), seeds)


def bootstrap_group(per_method: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]],
                    draws: Draws | np.ndarray) -> dict[str, dict[str, Estimate]]:
    """``per_method[label][metric]`` holds the group's values as a [seeds, cases] matrix (NaN where a case or
    seed lacks the metric), all over the same seed and case order, or one value per case (one seed);
    ``draws``: ``hierarchical_draws``, or a [resamples, cases] matrix of ``resample_indices`` (one seed).
    Returns ``[label][metric or "avg"] -> Estimate``."""
    if isinstance(draws, np.ndarray):
        draws = Draws(np.zeros((draws.shape[0], 1), dtype=np.int64), draws[:, None, :])
    out: dict[str, dict[str, Estimate]] = {}
    for label, by_metric in per_method.items():
        estimates: dict[str, Estimate] = {}
        seed_means: dict[str, np.ndarray] = {}  # metric -> [S] per-seed means
        sample_means: dict[str, np.ndarray] = {}  # metric -> [R] resampled statistics
        for metric, values in by_metric.items():
            matrix = np.asarray(values, dtype=np.float64)
            matrix = matrix[None, :] if matrix.ndim == 1 else matrix
            if np.isnan(matrix).all():
                continue
            seed_means[metric] = _nanmean_rows(matrix)
            gathered = matrix[draws.seeds[:, :, None], draws.cases]  # [R, S, n]
            sample_means[metric] = _nanmean_rows(_nanmean_rows(gathered))
            estimates[metric] = _interval(sample_means[metric], float(np.nanmean(seed_means[metric])),
                                          seed_means[metric])
        counted = [m for m in seed_means if metric_registry.counts_in_average(m)]
        if counted:
            point = float(np.mean([estimates[m].mean for m in counted]))
            per_seed = _nanmean_rows(np.stack([seed_means[m] for m in counted], axis=-1))
            stacked = np.stack([sample_means[m] for m in counted], axis=-1)
            estimates[AVG] = _interval(_nanmean_rows(stacked), point, per_seed)
        out[label] = estimates
    return out
