"""The numbers a set of runs is summarised by: median, mean, spread, and the 95 % interval of the mean."""

from __future__ import annotations

import math

import pandas as pd
from scipy.stats import t as student_t

DIGITS = 6  # summary values are rounded here: accuracies to 1e-4 %, seconds to microseconds


def describe(values: pd.Series) -> dict:
    """n, median, mean, std (ddof 1), min, max and the 95 % interval of the mean (Student's t); std and the interval
    need two values (None with one)."""
    n = len(values)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else None
    half = t95(n - 1) * std / math.sqrt(n) if n > 1 else None
    stats = {"n": n, "median": float(values.median()), "mean": mean, "std": std, "min": float(values.min()),
             "max": float(values.max()), "ci95_low": mean - half if half is not None else None,
             "ci95_high": mean + half if half is not None else None}
    return {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in stats.items()}


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: a 95 % interval is mean +- t95 * s / sqrt(n)
    (2.0096 at 49, where 1.96 would be 2.5 % short)."""
    return float(student_t.ppf(0.975, df))
