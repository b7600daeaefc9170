"""Statistics shared by the analyses: correlations with p-values, Benjamini–Hochberg, OLS slope, Wilson CI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _stats

from causal.interchange_scores import wilson_interval

__all__ = ["benjamini_hochberg", "correlation", "ols_slope", "wilson_interval", "Slope"]


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values (same order as the input; NaN stays NaN)."""
    p = np.asarray(p_values, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.clip(ranked, 0, 1)
    q[ok] = out
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
    """Least-squares line through (x, y); SE from the residual variance (n-2 dof); NaN when n < 3."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        return Slope(np.nan, np.nan, np.nan, np.nan, n)
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    slope = ((x - xm) * (y - ym)).sum() / sxx
    intercept = ym - slope * xm
    resid = y - intercept - slope * x
    sst = ((y - ym) ** 2).sum()
    r2 = 1 - (resid ** 2).sum() / sst if sst > 0 else np.nan
    se = np.sqrt((resid ** 2).sum() / (n - 2) / sxx) if n > 2 else np.nan
    return Slope(float(slope), float(intercept), float(se), float(r2), n)
