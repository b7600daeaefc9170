"""Location verdicts: does patching a cell make the network follow a hypothesis's labels more than not
patching it does? Paired exact tests on the same pairs, error control across the sweep, graded verdicts,
hypothesis comparisons and controls. Torch-free; statistics from ``scipy.stats``. The rule is written up in
``docs/verdicts.md``.

Per pair i of a (variable, cell) and a scope (one family, or all families pooled):
``patched_i``: the patched output matches the variable's interchange label; ``unpatched_i``: the unpatched
(base) output matches the same label. The evidence is in the discordant pairs: ``gained`` (patched right,
unpatched wrong) and ``lost`` (patched wrong, unpatched right).

* **effect** = IIA − floor = (gained − lost) / n, with a percentile bootstrap CI over pairs;
* **test**: one-sided exact binomial (McNemar) test of gained against lost, H0: a patch is as likely to
  move the output away from the label as towards it (``scipy.stats.binom``, as ``binomtest`` computes it);
* **informative IIA**: the IIA on the pairs where the *network's own unpatched output* differs from the
  label (``n_informative`` = n − unpatched right), with an exact (Clopper–Pearson) CI, as the IIA's; unlike a restriction by the
  hypothesis's base label it cannot drop the pairs a patch moved away from the label;
* **correction**: Holm (default) or Benjamini–Hochberg across all (variable, cell) tests pooled over the
  families, and separately across all (family, variable, cell) tests of the per-family verdicts;
* **grade**: ``full`` (significant after correction, and both the IIA and the informative IIA have their CI's
  lower bound ≥ ``full_threshold``), ``partial`` (significant, effect ≥ ``min_effect``), ``none``.
  A hypothesis whose base labels the unpatched network matches on fewer than ``min_base_accuracy`` of the
  pairs does not describe the network: its verdicts are ``unsupported``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from causal.json_records import json_records

POOLED = "(pooled)"
GRADES = ("full", "partial", "none")
UNSUPPORTED = "unsupported"
GRADE_ORDER = {"full": 0, "partial": 1, "none": 2, UNSUPPORTED: 3}

TEST_COLUMNS = ["target_variables", "scope", "cell_id", "n", "n_patched", "n_unpatched", "gained", "lost",
                "iia", "iia_ci_low", "iia_ci_high", "floor", "effect", "effect_ci_low", "effect_ci_high",
                "n_informative", "informative_iia", "informative_ci_low", "informative_ci_high",
                "p_value", "p_adjusted", "significant", "grade"]


class VerdictRule(BaseModel):
    """The stated rule: test level, correction, grade thresholds. Printed with every verdict table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise (Holm) or false-discovery (BH) level")
    correction: Literal["holm", "bh"] = "holm"
    confidence: float = Field(0.95, gt=0, lt=1, description="level of every reported interval")
    full_threshold: float = Field(0.9, gt=0, le=1, description="full: CI lower bounds of IIA and informative IIA")
    min_effect: float = Field(0.05, ge=0, le=1, description="partial: smallest effect (IIA - floor) reported")
    min_base_accuracy: float = Field(0.9, ge=0, le=1, description="hypothesis must match the unpatched network")

    def describe(self) -> str:
        method = {"holm": "Holm (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}
        return (f"one-sided exact paired test (McNemar) of patched vs unpatched on the same pairs, "
                f"{method[self.correction]} at alpha = {self.alpha} across all pooled (variable, cell) tests, and "
                f"separately across all per-family (family, variable, cell) tests; effect CI: bootstrap over pairs; "
                f"full: significant and IIA and informative IIA both with {self.confidence:.0%} CI lower bound "
                f">= {self.full_threshold}; partial: significant and effect >= {self.min_effect}; "
                f"hypotheses matching the unpatched network on < {self.min_base_accuracy} of pairs: unsupported")


def adjust_p_values(p_values: Sequence[float] | np.ndarray, method: Literal["holm", "bh"]) -> np.ndarray:
    """Adjusted p-values (same order): Holm's step-down, or Benjamini-Hochberg via
    ``scipy.stats.false_discovery_control``. A test is significant at level alpha iff adjusted ≤ alpha."""
    p = np.asarray(p_values, dtype=float)
    if p.size == 0:
        return p.copy()
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p-values must lie in [0, 1]")
    if method == "bh":
        return np.asarray(stats.false_discovery_control(p, method="bh"), dtype=float)
    if method != "holm":
        raise ValueError(f"correction must be 'holm' or 'bh', got {method!r}")
    order = np.argsort(p, kind="stable")
    m = p.size
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def clopper_pearson(k: np.ndarray, n: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) interval of k/n, vectorised through ``scipy.stats.beta`` (the interval
    ``binomtest(k, n).proportion_ci(method="exact")`` gives); NaN where n == 0."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    tail = (1 - confidence) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, stats.beta.ppf(tail, k, n - k + 1), 0.0)
        high = np.where(k < n, stats.beta.isf(tail, k + 1, n - k), 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


BOOTSTRAP_RESAMPLES = 4000


def _bootstrap_effect_ci(gained: int, lost: int, n: int, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap CI of the effect (gained - lost) / n, resampling the n pairs. A resample of pairs
    is a multinomial draw of the (gained, lost, neither) counts, so it is drawn as one (seeded by the counts:
    the same data always give the same interval), from the observed shares smoothed by half a pair each."""
    if n <= 0:
        return math.nan, math.nan
    if gained + lost == 0:
        return 0.0, 0.0
    rng = np.random.default_rng([int(gained), int(lost), int(n)])
    # half a pair added to each category: a category never seen can still be drawn, so the interval does not
    # collapse to a point when every pair went one way
    counts = np.array([gained, lost, n - gained - lost], dtype=float) + 0.5
    draws = rng.multinomial(int(n), counts / counts.sum(), size=BOOTSTRAP_RESAMPLES)
    effects = (draws[:, 0] - draws[:, 1]) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(effects, [tail, 1 - tail])
    return float(low), float(high)


def paired_tests(gained: np.ndarray, lost: np.ndarray, n: np.ndarray, confidence: float = 0.95,
                 intervals: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (effect, CI low, CI high, one-sided exact p). effect = (gained - lost) / n; p = the exact
    binomial (McNemar) test of gained among the discordant pairs, ``P(X >= gained)`` for X ~ Bin(gained + lost,
    1/2) (what ``scipy.stats.binomtest(..., alternative="greater")`` computes); CI = percentile bootstrap over
    pairs (`_bootstrap_effect_ci`)."""
    gained, lost, n = (np.asarray(x, dtype=float) for x in (gained, lost, n))
    discordant = gained + lost
    with np.errstate(invalid="ignore", divide="ignore"):
        effect = np.where(n > 0, (gained - lost) / np.maximum(n, 1), np.nan)
        p = np.where(discordant > 0, stats.binom.sf(gained - 1, discordant, 0.5), 1.0)
    bounds = ([_bootstrap_effect_ci(int(g), int(l), int(m), confidence) for g, l, m in zip(gained, lost, n)]
              if intervals else [(math.nan, math.nan)] * len(n))
    low = np.array([b[0] for b in bounds], dtype=float)
    high = np.array([b[1] for b in bounds], dtype=float)
    return effect, low, high, p


def paired_test(gained: int, lost: int, n: int, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(effect, CI low, CI high, one-sided p) of patched vs unpatched from the counts of n pairs (`paired_tests`)."""
    effect, low, high, p = paired_tests(np.array([gained]), np.array([lost]), np.array([n]), confidence)
    return float(effect[0]), float(low[0]), float(high[0]), float(p[0])


def paired_counts(per_example: pd.DataFrame, by_family: bool) -> pd.DataFrame:
    """Counts per (target_variables, scope, cell_id) from a per-pair table with boolean ``correct``
    (patched matches the label) and ``base_correct_on_label`` (unpatched matches it)."""
    frame = pd.DataFrame({
        "target_variables": per_example["target_variables"].to_numpy(),
        "scope": per_example["dataset_id"].to_numpy() if by_family else POOLED,
        "cell_id": per_example["cell_id"].to_numpy(),
        "patched": per_example["correct"].to_numpy(dtype=bool),
        "unpatched": per_example["base_correct_on_label"].to_numpy(dtype=bool),
    })
    frame["gained"] = frame["patched"] & ~frame["unpatched"]
    frame["lost"] = ~frame["patched"] & frame["unpatched"]
    keys = ["target_variables", "scope", "cell_id"]
    grouped = frame.groupby(keys, sort=False)
    counts = grouped[["patched", "unpatched", "gained", "lost"]].sum().astype(np.int64)
    counts["n"] = grouped.size()
    counts = counts.rename(columns={"patched": "n_patched", "unpatched": "n_unpatched"}).reset_index()
    return counts[["target_variables", "scope", "cell_id", "n", "n_patched", "n_unpatched", "gained", "lost"]]


def cell_tests(counts: pd.DataFrame, rule: VerdictRule, unsupported: Mapping[str, bool] | None = None,
               intervals: bool = True) -> pd.DataFrame:
    """Every (variable, scope, cell) of ``counts`` tested and graded (`TEST_COLUMNS`); the correction runs
    over all (variable, cell) rows of each scope. ``unsupported[scope]``: the hypothesis does not describe
    the network there (every grade in that scope becomes ``unsupported``)."""
    table = counts[["target_variables", "scope", "cell_id", "n", "n_patched", "n_unpatched", "gained", "lost"]].copy()
    n, gained = table["n"].to_numpy(float), table["gained"].to_numpy(float)
    effect, low, high, p = paired_tests(gained, table["lost"].to_numpy(float), n, rule.confidence, intervals)
    n_inf = n - table["n_unpatched"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["iia"] = np.where(n > 0, table["n_patched"] / np.maximum(n, 1), np.nan)
        table["iia_ci_low"], table["iia_ci_high"] = clopper_pearson(table["n_patched"].to_numpy(float), n,
                                                                    rule.confidence)
        table["floor"] = np.where(n > 0, table["n_unpatched"] / np.maximum(n, 1), np.nan)
        table["effect"], table["effect_ci_low"], table["effect_ci_high"] = effect, low, high
        table["n_informative"] = n_inf.astype(np.int64)
        table["informative_iia"] = np.where(n_inf > 0, gained / np.maximum(n_inf, 1), np.nan)
        table["informative_ci_low"], table["informative_ci_high"] = clopper_pearson(gained, n_inf, rule.confidence)
    table["p_value"] = p
    table["p_adjusted"] = np.nan
    family_of_tests = np.where(table["scope"] == POOLED, POOLED, "families")
    for _, index in table.groupby(family_of_tests, sort=False).groups.items():
        table.loc[index, "p_adjusted"] = adjust_p_values(table.loc[index, "p_value"].to_numpy(), rule.correction)
    table["significant"] = table["p_adjusted"] <= rule.alpha
    full = (table["significant"] & (table["iia_ci_low"] >= rule.full_threshold)
            & (table["informative_ci_low"].fillna(-1.0) >= rule.full_threshold))
    partial = table["significant"] & (table["effect"] >= rule.min_effect)
    table["grade"] = np.where(full, "full", np.where(partial, "partial", "none"))
    if unsupported:
        bad = table["scope"].map(lambda s: bool(unsupported.get(s, False)))
        table.loc[bad, "grade"] = UNSUPPORTED
    return table[TEST_COLUMNS]


def _best_rows(tests: pd.DataFrame, cell_order: Mapping[str, int]) -> pd.DataFrame:
    """Per (variable, scope): the best cell — best grade, then largest effect, then larger CI low, then order."""
    if tests.empty:
        return tests.assign(n_located=pd.Series(dtype=np.int64))
    frame = tests.assign(_g=tests["grade"].map(GRADE_ORDER), _e=-tests["effect"].fillna(-math.inf),
                         _l=-tests["effect_ci_low"].fillna(-math.inf),
                         _o=tests["cell_id"].map(lambda c: cell_order.get(c, math.inf)))
    frame = frame.sort_values(["_g", "_e", "_l", "_o"], kind="stable")
    located = tests["grade"].isin(["full", "partial"])
    n_located = located.groupby([tests["target_variables"], tests["scope"]], sort=False).sum()
    best = frame.groupby(["target_variables", "scope"], sort=False).head(1).drop(columns=["_g", "_e", "_l", "_o"])
    best = best.join(n_located.rename("n_located"), on=["target_variables", "scope"])
    return best.reset_index(drop=True)


@dataclass
class Verdicts:
    """Verdicts of one hypothesis (or control) on one experiment's results.

    ``tests``: every (variable, scope, cell) graded (`TEST_COLUMNS`), scope = a family id or ``"(pooled)"``.
    ``best``: per (variable, scope) the best cell (read its ``grade``: ``none`` means no cell carries the
    variable there) with ``n_located``. ``base_fit``: per scope, how often the unpatched output matches
    the hypothesis's base label. ``disagreements``: human-readable lines where a family's verdict differs
    from the pooled one.
    """

    name: str
    rule: VerdictRule
    tests: pd.DataFrame
    best: pd.DataFrame
    base_fit: pd.DataFrame
    disagreements: list[str] = field(default_factory=list)
    is_control: bool = False

    def _best_row(self, variable: str, scope: str) -> pd.Series:
        rows = self.best[(self.best["target_variables"] == variable) & (self.best["scope"] == scope)]
        if rows.empty:
            raise KeyError(f"no verdict for {variable!r} in scope {scope!r}")
        return rows.iloc[0]

    def verdict(self, variable: str, scope: str = POOLED) -> str:
        return str(self._best_row(variable, scope)["grade"])

    def location(self, variable: str, scope: str = POOLED) -> str | None:
        """The best cell's id when the verdict is full or partial, else None ("no cell carries it")."""
        row = self._best_row(variable, scope)
        return str(row["cell_id"]) if row["grade"] in ("full", "partial") else None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe record: the rule (fields and text), every test, the best cells, the base fit, the disagreements."""
        return {"name": self.name, "is_control": self.is_control, "rule": self.rule.model_dump(),
                "rule_text": self.rule.describe(), "best": json_records(self.best), "tests": json_records(self.tests),
                "base_fit": json_records(self.base_fit), "disagreements": self.disagreements}

    @property
    def fits(self) -> bool:
        """Whether the hypothesis describes the unpatched network on the pooled pairs."""
        pooled = self.base_fit[self.base_fit["scope"] == POOLED]
        return bool(pooled["fits"].iloc[0]) if len(pooled) else True

    def located_variables(self, scope: str = POOLED) -> list[str]:
        rows = self.best[(self.best["scope"] == scope) & self.best["grade"].isin(["full", "partial"])]
        return rows["target_variables"].tolist()


def _base_fit(base_accuracy: pd.DataFrame | None, rule: VerdictRule) -> pd.DataFrame:
    columns = ["scope", "n", "n_correct", "accuracy", "fits"]
    if base_accuracy is None or base_accuracy.empty:
        return pd.DataFrame(columns=columns)
    rows = [{"scope": r.dataset_id, "n": int(r.n), "n_correct": int(r.n_correct)}
            for r in base_accuracy.itertuples(index=False)]
    rows.append({"scope": POOLED, "n": sum(r["n"] for r in rows), "n_correct": sum(r["n_correct"] for r in rows)})
    frame = pd.DataFrame(rows)
    frame["accuracy"] = frame["n_correct"] / frame["n"].where(frame["n"] > 0)
    frame["fits"] = frame["accuracy"].fillna(0.0) >= rule.min_base_accuracy
    return frame[columns]


def _disagreements(best: pd.DataFrame, tests: pd.DataFrame) -> list[str]:
    lines = []
    pooled = best[best["scope"] == POOLED].set_index("target_variables")
    by_key = tests.set_index(["target_variables", "scope", "cell_id"])
    for variable, row in pooled.iterrows():
        families = best[(best["target_variables"] == variable) & (best["scope"] != POOLED)]
        for fam in families.itertuples(index=False):
            note = None
            if fam.grade != row["grade"]:
                where = f" at {fam.cell_id} (effect {fam.effect:+.3f})" if fam.grade in ("full", "partial") else ""
                note = f"{fam.scope}: {fam.grade}{where}"
            key = (variable, fam.scope, row["cell_id"])
            if row["grade"] in ("full", "partial") and key in by_key.index:
                at = by_key.loc[key]
                if at["effect_ci_high"] < 0:
                    note = (note or f"{fam.scope}") + (f" (at the pooled cell {row['cell_id']} the effect has the "
                                                        f"other sign: {at['effect']:+.3f})")
                elif at["grade"] == "none" and note is None:
                    note = f"{fam.scope}: no effect at the pooled cell {row['cell_id']}"
            if note:
                lines.append(f"{variable}: pooled {row['grade']}, but {note}")
    return lines


def verdicts_from_per_example(name: str, per_example: pd.DataFrame, rule: VerdictRule | None = None,
                              base_accuracy: pd.DataFrame | None = None, cell_order: Sequence[str] | None = None,
                              is_control: bool = False) -> Verdicts:
    """Verdicts pooled and per family from a per-pair table (columns ``target_variables``, ``dataset_id``,
    ``cell_id``, ``correct``, ``base_correct_on_label``, as `InterchangeScores.per_example`)."""
    rule = rule or VerdictRule()
    fit = _base_fit(base_accuracy, rule)
    unsupported = {r.scope: not r.fits for r in fit.itertuples(index=False)}
    counts = pd.concat([paired_counts(per_example, by_family=False), paired_counts(per_example, by_family=True)],
                       ignore_index=True)
    tests = cell_tests(counts, rule, unsupported)
    order = {c: i for i, c in enumerate(cell_order if cell_order is not None else dict.fromkeys(per_example["cell_id"]))}
    best = _best_rows(tests, order)
    return Verdicts(name, rule, tests, best, fit, _disagreements(best, tests), is_control)


def simulate_null_studies(n_studies: int, rule: VerdictRule | None = None, seed: int = 0, n_variables: int = 4,
                          n_cells: int = 8, n_pairs: int = 60, progress: bool = False, n_families: int = 1,
                          scope: Literal["pooled", "families"] = "pooled") -> float:
    """Share of simulated null studies in which the rule locates some variable anywhere in ``scope`` (the
    pooled verdicts, or any family's).

    Each study has ``n_variables`` × ``n_cells`` cells of ``n_pairs`` pairs; in every cell the patched and the
    unpatched outputs match the label independently with the same cell-specific rate (drawn uniformly in
    [0.1, 0.9]): patching changes nothing systematically, so every location is a false one."""
    rule = rule or VerdictRule()
    rng = np.random.default_rng(seed)
    located = 0
    studies = range(n_studies)
    if progress:
        from tqdm import tqdm

        studies = tqdm(studies, desc=f"null studies ({rule.correction})")
    size = n_variables * n_cells
    variables = np.repeat([f"v{v}" for v in range(n_variables)], n_cells * n_pairs)
    cells = np.tile(np.repeat([f"c{c}" for c in range(n_cells)], n_pairs), n_variables)
    families = np.repeat([f"f{k}" for k in range(n_families)], size * n_pairs)
    for _ in studies:
        rates = np.tile(np.repeat(rng.uniform(0.1, 0.9, size=size), n_pairs), n_families)
        total = size * n_pairs * n_families
        frame = pd.DataFrame({"target_variables": np.tile(variables, n_families), "dataset_id": families,
                              "cell_id": np.tile(cells, n_families), "correct": rng.random(total) < rates,
                              "base_correct_on_label": rng.random(total) < rates})
        counts = paired_counts(frame, by_family=scope == "families")
        tests = cell_tests(counts, rule, intervals=False)  # grades need no effect interval
        located += bool(tests["grade"].isin(["full", "partial"]).any())
    return located / n_studies


def compare_hypotheses(first: pd.DataFrame, second: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Paired comparison of two hypotheses at the same cells on the pairs where their labels differ.

    ``first``/``second``: per-pair tables (``target_variables``, ``dataset_id``, ``cell_id``,
    ``example_index``, ``expected``, ``correct``) of two hypotheses for one variable each (the variable names
    may differ). Per cell: ``n_differ`` pairs with different labels, ``first_only`` / ``second_only`` (the
    patched output matches one label and not the other), the share difference with its conditional exact CI,
    and the two-sided exact binomial p-value of first_only against second_only."""
    keys = ["dataset_id", "cell_id", "example_index"]
    a = first[[*keys, "expected", "correct"]].rename(columns={"expected": "label_a", "correct": "a"})
    b = second[[*keys, "expected", "correct"]].rename(columns={"expected": "label_b", "correct": "b"})
    joined = a.merge(b, on=keys, how="inner", validate="one_to_one")
    joined = joined[joined["label_a"].astype(str) != joined["label_b"].astype(str)]
    rows = []
    for cell, frame in joined.groupby("cell_id", sort=False):
        first_only = int((frame["a"] & ~frame["b"]).sum())
        second_only = int((~frame["a"] & frame["b"]).sum())
        n = len(frame)
        effect, low, high, _ = paired_test(first_only, second_only, n, confidence)
        discordant = first_only + second_only
        p = float(stats.binomtest(first_only, discordant, 0.5).pvalue) if discordant else 1.0
        rows.append({"cell_id": cell, "n_differ": n, "first_only": first_only, "second_only": second_only,
                     "difference": effect, "ci_low": low, "ci_high": high, "p_value": p})
    return pd.DataFrame(rows, columns=["cell_id", "n_differ", "first_only", "second_only", "difference", "ci_low",
                                       "ci_high", "p_value"])


def test_summary(row: Any) -> dict[str, Any]:
    """JSON-ready summary of one graded test row (a row of ``Verdicts.tests`` or ``Verdicts.best``)."""
    get = row.get if hasattr(row, "get") else lambda k: getattr(row, k)
    return {"grade": str(get("grade")), "cell_id": str(get("cell_id")), "effect": float(get("effect")),
            "effect_ci": [float(get("effect_ci_low")), float(get("effect_ci_high"))], "gained": int(get("gained")),
            "lost": int(get("lost")), "p_adjusted": float(get("p_adjusted"))}


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def verdict_table_lines(verdicts: Verdicts, scope: str = POOLED, describe: Mapping[str, str] | None = None) -> list[str]:
    """Markdown: per variable the verdict, best cell, effect with CI, IIA, floor, informative IIA, p (adjusted)."""
    describe = describe or {}
    lines = [f"| variable | verdict | cell | effect (IIA - floor) [{verdicts.rule.confidence:.0%} CI] | IIA | floor | "
             f"informative IIA [CI] (n) | gained / lost | p adj. ({verdicts.rule.correction}) | cells located |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = verdicts.best[verdicts.best["scope"] == scope]
    for r in rows.itertuples(index=False):
        name = r.target_variables + (f" ({describe[r.target_variables]})" if r.target_variables in describe else "")
        located = r.grade in ("full", "partial")
        cell = f"`{r.cell_id}`" if located else f"none (largest effect: `{r.cell_id}`)"
        lines.append(
            f"| {name} | **{r.grade}** | {cell} | {_fmt(r.effect)} [{_fmt(r.effect_ci_low)}, {_fmt(r.effect_ci_high)}] | "
            f"{_fmt(r.iia)} | {_fmt(r.floor)} | {_fmt(r.informative_iia)} [{_fmt(r.informative_ci_low)}, "
            f"{_fmt(r.informative_ci_high)}] ({r.n_informative}) | {r.gained} / {r.lost} | {r.p_adjusted:.2g} | "
            f"{r.n_located} |")
    return lines
