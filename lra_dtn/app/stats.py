"""The statistics of the tables: mean and sample std over seeds, and the paired difference to the
baseline with its 95 % t-interval (no scipy: the only quantile needed is t(0.975, df))."""
from __future__ import annotations

import math
from dataclasses import dataclass

# Two-sided 95% quantiles t(0.975, df) for df = 1..30 (standard tables; checked in tests against a
# numerical integral of the t density).
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table up to 30, then the Cornish-Fisher expansion (error < 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass
class PairedDiff:
    """Mean of per-seed differences with its 95% paired t-interval (None when n = 1)."""

    mean: float
    n: int
    low: float | None
    high: float | None
    seeds: list[int]


def paired_diff(a: dict[int, float], b: dict[int, float]) -> PairedDiff | None:
    """``a - b`` over the seeds both have: a run and its baseline share the seed's data order and
    initialisation stream, so the per-seed difference cancels that noise."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    if std is None:
        return PairedDiff(mean, 1, None, None, seeds)
    half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return PairedDiff(mean, len(diffs), mean - half, mean + half, seeds)
