"""The report's one statistical test: two configurations paired by seed, a two-sided paired t-test.

A difference is claimed only when |mean| > t_0.975(n-1) * std / sqrt(n) (p < 0.05) over the n seeds
both have; the verdicts under each table and the bold cells of the LaTeX tables use it alike.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Paired:
    """``a - b`` over the seeds both have: mean, sample std (None below 2 seeds), n, p < 0.05."""

    mean: float | None
    std: float | None
    n: int
    significant: bool


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Per-seed values of two rows (``{seed: value}``) compared by a paired t-test at p < 0.05."""
    from scipy.stats import t as student_t

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    if n < 2:
        return Paired(statistics.fmean(diffs) if diffs else None, None, n, False)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    return Paired(mean, sd, n, abs(mean) > student_t.ppf(0.975, n - 1) * sd / math.sqrt(n))
