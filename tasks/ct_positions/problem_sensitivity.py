"""Which problems an intervention breaks: per-problem features, impact, correlations with p-values.

Features (:func:`problem_features`, from the question text and, when known, the operations):
``n_tokens`` (tokenizer length, or whitespace words without a tokenizer), ``n_operations``,
``n_operation_types``, ``max_number`` (largest number in the question), ``multi_step``
(n_operations > 1), ``has_division``, ``has_multiplication``, ``has_fractions`` (``a/b``, a decimal,
or half/third/quarter). Operations come from the problem's known steps; without them, from the
symbols and words of the question (each clause counts each
operation type at most once).

Impact of an intervention on a problem = baseline correct − intervention correct (1: broken,
0: unchanged, −1: fixed). Correlations: Pearson r and Spearman ρ with two-sided p-values from
``scipy.stats.pearsonr`` / ``scipy.stats.spearmanr`` (None for a constant feature or impact).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

FEATURES: tuple[str, ...] = ("n_tokens", "n_operations", "n_operation_types", "max_number", "multi_step",
                             "has_division", "has_multiplication", "has_fractions")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_FRACTION = re.compile(r"\d+\s*/\s*\d+|\d+\.\d+|\bhalf\b|\bthird\b|\bquarter\b|\bhalves\b", re.IGNORECASE)
_WORD_OPS = {
    "add": re.compile(r"\+|\bmore\b|\bbuys\b|\badds?\b|\btotal\b|\bsum\b", re.I),
    "sub": re.compile(r"(?<=\d)\s*-\s*(?=\d)|\bgives away\b|\bless\b|\bleft\b|\bspends?\b|\bloses?\b", re.I),
    "mul": re.compile(r"\*|×|\btimes\b|\bdoubles?\b|\btriples?\b|\bquadruples?\b|\beach\b|\bper\b", re.I),
    "div": re.compile(r"(?<=\d)\s*/\s*(?=\d)|÷|\bhalf\b|\bthird\b|\bquarter\b|\bsplit\b|\bdivid", re.I),
}


_CLAUSE = re.compile(r"\.\s|\.$|[;?!]|,\s|\bthen\b|\band\b", re.I)


def _ops_from_text(text: str) -> list[str]:
    """Operations named in a text: each clause contributes each operation type at most once."""
    return [op for clause in _CLAUSE.split(text) for op, pattern in _WORD_OPS.items() if pattern.search(clause)]


def problem_features(question: str, ops: Sequence[str] | None = None,
                     tokenize: Callable[[str], Sequence[Any]] | None = None) -> dict[str, float]:
    """The features of one problem (module docstring)."""
    ops = list(ops) if ops else _ops_from_text(question)
    numbers = [float(n.replace(",", "")) for n in _NUMBER.findall(question)]
    n_ops = len(ops)
    return {
        "n_tokens": float(len(tokenize(question)) if tokenize is not None else len(question.split())),
        "n_operations": float(n_ops),
        "n_operation_types": float(len(set(ops))),
        "max_number": float(max(numbers) if numbers else 0.0),
        "multi_step": float(n_ops > 1),
        "has_division": float("div" in ops),
        "has_multiplication": float("mul" in ops),
        "has_fractions": float(bool(_FRACTION.search(question))),
    }


def correlation(x: Sequence[float], y: Sequence[float], method: str = "pearson") -> tuple[float | None, float | None]:
    """(coefficient, two-sided p-value) from ``scipy.stats.pearsonr`` / ``spearmanr``; (None, None)
    when x or y is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or len(x) < 3:
        raise ValueError("x and y must have the same length >= 3")
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be pearson or spearman, got {method!r}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    result = stats.pearsonr(x, y) if method == "pearson" else stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def sensitivity_report(features: pd.DataFrame, impact: pd.Series, problem_type: pd.Series | None = None,
                       baseline_correct: pd.Series | None = None) -> dict[str, Any]:
    """``features``: one row per problem (index problem_id, :data:`FEATURES` columns); ``impact``: same index.

    Returns correlations per feature, impact by problem type, and feature means of high-impact
    (impact > 0) vs other problems. With ``baseline_correct`` the same report restricted to the
    problems the baseline solves is added under ``"among_baseline_correct"`` (there impact is 1 or 0,
    the chance of being broken, free of the baseline's own difficulty profile)."""
    if baseline_correct is not None:
        keep = baseline_correct.reindex(features.index).fillna(False).astype(bool)
        out = sensitivity_report(features, impact, problem_type)
        out["among_baseline_correct"] = (sensitivity_report(features[keep], impact[keep[keep].index],
                                                            None if problem_type is None else problem_type[keep])
                                         if keep.sum() >= 3 else None)
        return out
    impact = impact.reindex(features.index).astype(float)
    out: dict[str, Any] = {"n": int(len(impact)), "mean_impact": float(impact.mean()),
                           "n_broken": int((impact > 0).sum()), "n_fixed": int((impact < 0).sum()),
                           "correlations": {}}
    for feature in features.columns:
        r, p = correlation(features[feature], impact, "pearson") if len(impact) >= 3 else (None, None)
        rho, p_rho = correlation(features[feature], impact, "spearman") if len(impact) >= 3 else (None, None)
        out["correlations"][feature] = {"pearson_r": r, "pearson_p": p, "spearman_rho": rho, "spearman_p": p_rho}
    if problem_type is not None:
        frame = pd.DataFrame({"type": problem_type.reindex(features.index), "impact": impact})
        out["impact_by_type"] = {str(t): {"n": int(len(g)), "mean_impact": float(g["impact"].mean())}
                                 for t, g in frame.groupby("type", sort=True)}
    high = impact > 0
    out["high_vs_low_impact_means"] = {
        f: {"high": float(features.loc[high, f].mean()) if high.any() else None,
            "low": float(features.loc[~high, f].mean()) if (~high).any() else None}
        for f in features.columns
    }
    return out


def plot_sensitivity(features: pd.DataFrame, impacts: dict[str, pd.Series], reports: dict[str, dict[str, Any]],
                     scatter_path: str, bar_path: str, seed: int = 0) -> None:
    """Scatter (jittered impact vs each feature, one colour per condition) and bars of Pearson r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    cols = list(features.columns)
    fig, axes = plt.subplots(2, (len(cols) + 1) // 2, figsize=(3 * ((len(cols) + 1) // 2), 6))
    for ax, feature in zip(axes.flat, cols):
        for condition, impact in impacts.items():
            x = features[feature].to_numpy(float)
            y = impact.reindex(features.index).to_numpy(float)
            ax.scatter(x + rng.normal(0, 0.05 * (np.std(x) or 1), len(x)), y + rng.normal(0, 0.06, len(y)),
                       s=4, alpha=0.3, label=condition)
        ax.set_title(feature, fontsize=8)
        ax.set_yticks([-1, 0, 1])
    axes.flat[0].legend(fontsize=6, markerscale=2)
    fig.supylabel("impact (baseline − intervention correct)")
    fig.tight_layout()
    fig.savefig(scatter_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cols)), 3.5))
    width = 0.8 / max(1, len(reports))
    for i, (condition, report) in enumerate(reports.items()):
        values = [report["correlations"][f]["pearson_r"] or 0.0 for f in cols]
        ax.bar(np.arange(len(cols)) + i * width, values, width, label=condition)
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2)
    ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("Pearson r with impact")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(bar_path, dpi=110)
    plt.close(fig)
