"""Statistics shared by the analyses: correlations with p-values, Benjamini–Hochberg, OLS slope, Wilson CI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _stats

from causal.interchange_scores import wilson_interval

__all__ = ["benjamini_hochberg", "correlation", "ols_slope", "wilson_interval", "Slope"]


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values (``scipy.stats.false_discovery_control``, method ``"bh"``) over the
    non-NaN entries; same shape and order as the input, NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = _stats.false_discovery_control(p[ok], method="bh")
    return q


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman r with two-sided p-values; NaN when n < 3 or either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    nan = {"n": int(len(x)), "pearson_r": np.nan, "pearson_p": np.nan, "spearman_r": np.nan, "spearman_p": np.nan}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return nan
    pr = _stats.pearsonr(x, y)
    sr = _stats.spearmanr(x, y)
    return {"n": int(len(x)), "pearson_r": float(pr.statistic), "pearson_p": float(pr.pvalue),
            "spearman_r": float(sr.statistic), "spearman_p": float(sr.pvalue)}


@dataclass(frozen=True)
class Slope:
    """OLS fit y = intercept + slope·x with the slope's standard error and R²."""

    slope: float
    intercept: float
    se: float
    r2: float
    n: int


def ols_slope(x: np.ndarray, y: np.ndarray) -> Slope:
    """Least-squares line through (x, y) by ``scipy.stats.linregress``: slope, intercept, the slope's
    SE (residual variance, n-2 dof) and R² = r².

    All NaN when n < 2 or x is constant; SE NaN when n == 2 (no residual dof); for a constant y the
    fit is exact (slope 0, SE 0) and R² is NaN (no variance to explain)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        return Slope(np.nan, np.nan, np.nan, np.nan, n)
    fit = _stats.linregress(x, y)
    if n == 2:
        se = np.nan
    elif np.ptp(y) == 0:
        se = 0.0  # linregress reports NaN here; the residuals are all zero
    else:
        se = fit.stderr
    return Slope(float(fit.slope), float(fit.intercept), float(se), float(fit.rvalue ** 2), n)
