"""Error taxonomy of numeric answers, and its distribution per condition with paired bootstrap CIs.

Rules (:func:`classify`, first match wins; numbers compared as floats with tolerance 1e-6):

1. ``NONE`` — the generated text is empty or whitespace only.
2. ``NONSENSE`` — text but no parseable number.
3. ``CORRECT`` — the parsed answer equals the gold answer.
4. ``PARTIAL_ANSWER`` — it equals an intermediate result of the problem (a step before the last).
5. ``SIGN_ERROR`` — it equals ``-gold`` (gold != 0).
6. ``OPERATION_REVERSAL`` — it equals the result of the problem with one operation reversed
   (add <-> sub, mul <-> div), when the problem's structure is known (``reversals``).
7. ``OFF_BY_FACTOR`` — ``answer / gold`` is one of 2, 3, 4, 10, 100, 1000 or their reciprocals.
8. ``CALC_ERROR`` — close to gold: ``|answer - gold| <= max(2, 0.1 * |gold|)``, or both integers with
   the same number of digits differing in exactly one digit.
9. ``LOGIC_ERROR`` — any other wrong number.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

CATEGORIES: tuple[str, ...] = ("CORRECT", "CALC_ERROR", "LOGIC_ERROR", "OFF_BY_FACTOR", "SIGN_ERROR",
                               "OPERATION_REVERSAL", "PARTIAL_ANSWER", "NONSENSE", "NONE")
FACTORS: tuple[float, ...] = (2, 3, 4, 10, 100, 1000)
_TOL = 1e-6
_REVERSE = {"add": "sub", "sub": "add", "mul": "div", "div": "mul"}


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(str(value).replace(",", ""))
    except ValueError:
        return None


def _eq(a: float, b: float) -> bool:
    return abs(a - b) <= _TOL * max(1.0, abs(b))


def reversal_results(start: float, ops: Sequence[str], args: Sequence[float]) -> list[float]:
    """Final results of the chain with exactly one operation reversed (inexact/zero divisions skipped)."""
    out = []
    for flip in range(len(ops)):
        value, ok = float(start), True
        for i, (op, arg) in enumerate(zip(ops, args)):
            op = _REVERSE.get(op, op) if i == flip else op
            if op == "add":
                value += arg
            elif op == "sub":
                value -= arg
            elif op == "mul":
                value *= arg
            elif op == "div" and arg != 0:
                value /= arg
            else:
                ok = False
                break
        if ok:
            out.append(value)
    return out


def _one_digit_apart(a: float, b: float) -> bool:
    if a != int(a) or b != int(b) or (a < 0) != (b < 0):
        return False
    sa, sb = str(abs(int(a))), str(abs(int(b)))
    return len(sa) == len(sb) and sum(x != y for x, y in zip(sa, sb)) == 1


def classify(text: str | None, parsed: Any, gold: Any, intermediates: Sequence[Any] = (),
             reversals: Sequence[float] = ()) -> str:
    """The category of one prediction (rules in the module docstring)."""
    if text is None or not str(text).strip():
        return "NONE"
    answer, target = _num(parsed), _num(gold)
    if answer is None:
        return "NONSENSE"
    if target is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    if _eq(answer, target):
        return "CORRECT"
    if any(_eq(answer, v) for v in (_num(x) for x in intermediates) if v is not None):
        return "PARTIAL_ANSWER"
    if target != 0 and _eq(answer, -target):
        return "SIGN_ERROR"
    if any(_eq(answer, v) for v in reversals):
        return "OPERATION_REVERSAL"
    if target != 0 and any(_eq(answer, target * f) or _eq(answer, target / f) for f in FACTORS):
        return "OFF_BY_FACTOR"
    if abs(answer - target) <= max(2.0, 0.1 * abs(target)) or _one_digit_apart(answer, target):
        return "CALC_ERROR"
    return "LOGIC_ERROR"


def distribution(categories: Sequence[str]) -> dict[str, float]:
    """Share of each category (all categories present, summing to 1)."""
    n = len(categories)
    return {c: (sum(x == c for x in categories) / n if n else float("nan")) for c in CATEGORIES}


def paired_bootstrap_diff(base: np.ndarray, other: np.ndarray, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``other - base`` over paired problems and its percentile bootstrap CI."""
    base, other = np.asarray(base, float), np.asarray(other, float)
    if base.shape != other.shape or base.ndim != 1 or not len(base):
        raise ValueError("base and other must be non-empty 1-D arrays of the same length")
    diff = other - base
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(1)
    alpha = (1 - level) / 2
    return float(diff.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def taxonomy_report(frame: pd.DataFrame, baseline: str = "baseline", n_boot: int = 2000, seed: int = 0
                    ) -> dict[str, Any]:
    """``frame``: one row per (condition, problem_id) with a ``category`` column. Returns
    {"conditions": {cond: {"n", "distribution", "counts", "change_vs_baseline": {cat: {diff, ci_low, ci_high}}}}}."""
    if baseline not in set(frame["condition"]):
        raise ValueError(f"no {baseline!r} condition in the predictions")
    base = frame[frame["condition"] == baseline].set_index("problem_id")["category"]
    out: dict[str, Any] = {"baseline": baseline, "categories": list(CATEGORIES), "conditions": {}}
    for condition, group in frame.groupby("condition", sort=False):
        cats = group.set_index("problem_id")["category"]
        common = base.index.intersection(cats.index)
        entry: dict[str, Any] = {"n": int(len(cats)), "distribution": distribution(list(cats)),
                                 "counts": {c: int((cats == c).sum()) for c in CATEGORIES}}
        if condition != baseline:
            change = {}
            for c in CATEGORIES:
                diff, low, high = paired_bootstrap_diff((base[common] == c).to_numpy(),
                                                        (cats[common] == c).to_numpy(), n_boot, seed)
                change[c] = {"diff": diff, "ci_low": low, "ci_high": high}
            entry["change_vs_baseline"] = change
        out["conditions"][str(condition)] = entry
    return out


def taxonomy_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per condition: accuracy, the most common error, and categories whose share changed significantly."""
    summary = {}
    for condition, entry in report["conditions"].items():
        dist = entry["distribution"]
        errors = {c: v for c, v in dist.items() if c != "CORRECT"}
        top = max(errors, key=errors.get) if errors else None
        significant = {c: round(v["diff"], 4) for c, v in entry.get("change_vs_baseline", {}).items()
                       if v["ci_low"] > 0 or v["ci_high"] < 0}
        summary[condition] = {"n": entry["n"], "accuracy": dist["CORRECT"], "top_error": top,
                              "top_error_share": errors.get(top) if top else None,
                              "significant_changes": significant}
    return summary


def plot_taxonomy(report: dict[str, Any], path: str) -> None:
    """Stacked bars: category shares per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(report["conditions"])
    fig, ax = plt.subplots(figsize=(1.2 * len(conditions) + 3, 4))
    bottom = np.zeros(len(conditions))
    colors = plt.get_cmap("tab10")
    for i, cat in enumerate(CATEGORIES):
        values = np.array([report["conditions"][c]["distribution"][cat] for c in conditions])
        ax.bar(conditions, values, bottom=bottom, label=cat, color=colors(i % 10))
        bottom += values
    ax.set_ylabel("share of problems")
    ax.set_title("answer categories per condition")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
