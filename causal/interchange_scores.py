"""Score raw interchange-intervention results against a causal model. Torch-free.

`compute_interchange_scores` reads a results folder (see `causal.results`), labels each
counterfactual example with the causal model's output under an interchange of each group
of target variables, and applies a checker. Per (target-variable group, dataset, cell) it
reports three proportions on the same pairs, each with a 95% Wilson score interval:

* **IIA** (``accuracy``): the checker on the intervened output against the interchange label;
* **floor** (``floor``): the checker on the *unintervened* base output against the same labels:
  what a patch that changes nothing scores. An IIA near its floor shows no effect;
* **informative IIA** (``informative_accuracy``, ``n_informative``): the IIA restricted to the
  *informative* pairs, those whose interchange label differs from the causal model's label of
  the base input without intervention. Only there must the patch move the output.

Scores over several datasets are pooled over pairs (`InterchangeScores.pooled`), never averaged
over datasets, and can always be broken down per dataset family (`InterchangeScores.per_family`).

**Where a variable lives.** A cell is *above its floor* when it has informative pairs and its
informative IIA is strictly greater than the upper end of the 95% Wilson interval of its floor
(the floor on all its pairs, the same pairs the IIA is computed on). The *best cell* of a group
(`InterchangeScores.best_cells`, the one rule used by summaries, step scripts and heatmaps) is,
among the cells above their floor, the one with the highest informative IIA; ties go to the
higher lower bound of the informative IIA's interval, then the earlier layer (of the cell's
first unit), then the earlier cell in the manifest. When no cell is above its floor, no cell is
reported as the location of that group ("no cell carries X").
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from causal.causal_model import RAW_OUTPUT, CausalModel, parse_target
from causal.counterfactual_dataset import CounterfactualDataset, as_dataset_dict
from causal.results import RawResults, ResultsError, atomic_write_json, atomic_write_parquet
from causal.json_records import json_records, json_scalar
from causal.verdicts import Verdicts, VerdictRule, verdicts_from_per_example

Z_95 = 1.959963984540054

ADDRESS_COLUMNS = ["layer", "component", "head", "position_id"]
COUNT_COLUMNS = ["n", "n_correct", "floor_correct", "n_informative", "n_informative_correct"]
"""Additive counts: pooling over datasets sums them, every rate is derived from them."""
SCORE_COLUMNS = ["n", "n_correct", "accuracy", "ci_low", "ci_high",
                 "floor_correct", "floor", "floor_ci_low", "floor_ci_high",
                 "n_informative", "n_informative_correct", "informative_accuracy", "informative_ci_low",
                 "informative_ci_high", "above_floor"]
TABLE_COLUMNS = ["target_variables", "dataset_id", "cell_id", *ADDRESS_COLUMNS, "n_units", *SCORE_COLUMNS]
POOLED_COLUMNS = [c for c in TABLE_COLUMNS if c != "dataset_id"]
PER_EXAMPLE_COLUMNS = ["target_variables", "dataset_id", "cell_id", "example_index", "expected", "output_text",
                       "correct", "base_label", "informative", "base_correct_on_label"]
BASE_COLUMNS = ["dataset_id", "n", "n_correct", "accuracy", "ci_low", "ci_high"]


def wilson_interval(successes: int | np.ndarray, n: int | np.ndarray, z: float = Z_95) -> tuple[Any, Any]:
    """Wilson score interval for a binomial proportion (NaN where ``n == 0``), from
    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``. Works on arrays; ``z`` sets the level
    (1.96: 95%)."""
    k = np.asarray(successes)
    total = np.asarray(n)
    confidence = float(2 * stats.norm.cdf(z) - 1)
    flat_k, flat_n = np.broadcast_arrays(k, total)
    low = np.full(flat_k.shape, np.nan)
    high = np.full(flat_k.shape, np.nan)
    for index in np.ndindex(flat_k.shape):
        if flat_n[index] > 0:
            ci = stats.binomtest(int(flat_k[index]), int(flat_n[index])).proportion_ci(confidence, method="wilson")
            low[index], high[index] = ci.low, ci.high
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def _rate(k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proportion ``k / n`` (NaN where ``n == 0``) with its 95% Wilson interval."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    low, high = wilson_interval(k, n)
    return p, np.asarray(low, dtype=float), np.asarray(high, dtype=float)


def _with_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``accuracy``, ``ci_low``, ``ci_high`` from ``n`` and ``n_correct``."""
    frame["accuracy"], frame["ci_low"], frame["ci_high"] = _rate(frame["n_correct"].to_numpy(), frame["n"].to_numpy())
    return frame


def _with_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Add every rate column (IIA, floor, informative IIA, ``above_floor``) from the counts in `COUNT_COLUMNS`."""
    frame = _with_accuracy(frame)
    n = frame["n"].to_numpy()
    frame["floor"], frame["floor_ci_low"], frame["floor_ci_high"] = _rate(frame["floor_correct"].to_numpy(), n)
    informative = _rate(frame["n_informative_correct"].to_numpy(), frame["n_informative"].to_numpy())
    frame["informative_accuracy"], frame["informative_ci_low"], frame["informative_ci_high"] = informative
    with np.errstate(invalid="ignore"):
        frame["above_floor"] = (frame["n_informative"].to_numpy() > 0) & (
            frame["informative_accuracy"].to_numpy() > frame["floor_ci_high"].to_numpy())
    return frame


def _group_name(group: list[str]) -> str:
    return "+".join(group)


def _normalize_groups(target_variables_list: Any, include_pairs: bool) -> list[list[str]]:
    if isinstance(target_variables_list, str):
        target_variables_list = [target_variables_list]
    groups: list[list[str]] = []
    names: set[str] = set()

    def add(group: list[str]) -> None:
        name = _group_name(group)
        if name not in names:
            names.add(name)
            groups.append(group)

    for group in target_variables_list:
        group = [group] if isinstance(group, str) else list(group)
        if not group:
            raise ValueError("target_variables_list holds an empty group")
        if len(set(group)) != len(group):
            raise ValueError(f"target variable group {group} lists a variable twice")
        add(group)
    if include_pairs:
        singles: list[str] = []
        for group in list(groups):
            if len(group) == 1 and group[0] not in singles:
                singles.append(group[0])
        for a, b in itertools.combinations(singles, 2):
            add([a, b])
    return groups


class InterchangeScores:
    """IIA, floor and informative IIA of every (target-variable group, dataset, cell); see the module docstring.

    ``table``: one row per (target_variables, dataset_id, cell_id) with the cell's address (of its
    first unit), the counts `COUNT_COLUMNS` and the rates with 95% Wilson intervals (`SCORE_COLUMNS`).
    ``per_example``: one row per (group, dataset, cell, example) with ``correct``, ``informative``,
    ``base_correct_on_label``. ``base_accuracy``: the checker on unintervened outputs against the
    causal model's base labels, per dataset. ``pooled()``: over datasets, pooled over pairs;
    ``per_family()``: per dataset; ``best_cells()``: where each group lives, if anywhere.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        per_example: pd.DataFrame,
        base_accuracy: pd.DataFrame,
        target_variables: list[list[str]] | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self.table = table
        self.per_example = per_example
        self.base_accuracy = base_accuracy
        self.target_variables = target_variables if target_variables is not None else [
            name.split("+") for name in dict.fromkeys(table["target_variables"])
        ]
        self.metadata = dict(metadata or {})

    @property
    def dataset_ids(self) -> list[str]:
        """Scored datasets (families), in manifest order."""
        return list(dict.fromkeys(self.table["dataset_id"]))

    def pooled(self, dataset_ids: list[str] | None = None) -> pd.DataFrame:
        """One row per (target_variables, cell_id): counts summed over the pairs of all (or the given) datasets.

        Pooling weighs every pair once, so a large family counts more than a small one; rates are
        recomputed from the pooled counts (not averaged over datasets).
        """
        table = self.table
        if dataset_ids is not None:
            unknown = sorted(set(dataset_ids) - set(table["dataset_id"]))
            if unknown:
                raise KeyError(f"datasets {unknown} are not in these scores (have {self.dataset_ids})")
            table = table[table["dataset_id"].isin(dataset_ids)]
        if table.empty:
            return pd.DataFrame(columns=POOLED_COLUMNS)
        keys = ["target_variables", "cell_id"]
        first = table.groupby(keys, sort=False)[[*ADDRESS_COLUMNS, "n_units"]].first()
        sums = table.groupby(keys, sort=False)[COUNT_COLUMNS].sum()
        frame = first.join(sums).reset_index()
        frame = _with_scores(frame)
        return frame[POOLED_COLUMNS]

    def averaged(self) -> pd.DataFrame:
        """Deprecated alias of `pooled` (the counts were always pooled over pairs, never averaged)."""
        warnings.warn("InterchangeScores.averaged() is deprecated; use pooled()", DeprecationWarning, stacklevel=2)
        return self.pooled()

    def per_family(self, target_variables: str | None = None, cell_id: str | None = None) -> pd.DataFrame:
        """The scores per dataset (family): one row per (group, cell, dataset), datasets in manifest order.

        Optionally restricted to one group (its ``"+"``-joined name) and/or one cell.
        """
        table = self.table
        if target_variables is not None:
            table = table[table["target_variables"] == target_variables]
        if cell_id is not None:
            table = table[table["cell_id"] == cell_id]
        if table.empty and (target_variables is not None or cell_id is not None):
            raise KeyError(f"no scores for target variables {target_variables!r}, cell {cell_id!r}")
        order = {name: i for i, name in enumerate(dict.fromkeys(self.table["target_variables"]))}
        cells = {name: i for i, name in enumerate(dict.fromkeys(self.table["cell_id"]))}
        datasets = {name: i for i, name in enumerate(self.dataset_ids)}
        keys = pd.DataFrame({"g": table["target_variables"].map(order), "c": table["cell_id"].map(cells),
                             "d": table["dataset_id"].map(datasets)}, index=table.index)
        return table.loc[keys.sort_values(["g", "c", "d"], kind="stable").index].reset_index(drop=True)

    def _scope(self, dataset_id: str | None) -> pd.DataFrame:
        if dataset_id is None:
            return self.pooled()
        rows = self.table[self.table["dataset_id"] == dataset_id]
        if rows.empty:
            raise KeyError(f"dataset {dataset_id!r} is not in these scores (have {self.dataset_ids})")
        return rows.drop(columns=["dataset_id"]).reset_index(drop=True)

    def ranked(self, dataset_id: str | None = None) -> pd.DataFrame:
        """Every cell of every group, best first by the best-cell rule (module docstring), pooled or on one dataset.

        Adds ``rank`` (0 = best, within the group). The rule ranks all cells; `best_cells` then skips the
        ones not above their floor.
        """
        frame = self._scope(dataset_id).copy()
        if frame.empty:
            return frame.assign(rank=pd.Series(dtype=np.int64))
        frame["_order"] = range(len(frame))
        frame["_group"] = frame["target_variables"].map(
            {name: i for i, name in enumerate(dict.fromkeys(frame["target_variables"]))})
        frame["_acc"] = frame["informative_accuracy"].astype(float).fillna(-1.0)
        frame["_low"] = frame["informative_ci_low"].astype(float).fillna(-1.0)
        frame["_layer"] = pd.to_numeric(frame["layer"], errors="coerce").astype(float).fillna(math.inf)
        frame = frame.sort_values(["_group", "_acc", "_low", "_layer", "_order"],
                                  ascending=[True, False, False, True, True], kind="stable")
        frame["rank"] = frame.groupby("_group", sort=False).cumcount()
        return frame.drop(columns=["_order", "_group", "_acc", "_low", "_layer"]).reset_index(drop=True)

    def best(self, top_k: int = 3, dataset_id: str | None = None) -> pd.DataFrame:
        """The ``top_k`` first cells of each group by the best-cell rule (whether above their floor or not)."""
        ranked = self.ranked(dataset_id)
        return ranked[ranked["rank"] < top_k].reset_index(drop=True)

    def best_cells(self, dataset_id: str | None = None) -> pd.DataFrame:
        """One row per group: where it lives, by the one best-cell rule (module docstring).

        ``located`` is True when some cell is above its floor; the row is then that group's best such
        cell. Otherwise ``located`` is False ("no cell carries the group") and the row holds the
        top-ranked cell only for reference: it must not be reported as a location.
        """
        ranked = self.ranked(dataset_id)
        rows = []
        for _, frame in ranked.groupby("target_variables", sort=False):
            passing = frame[frame["above_floor"].astype(bool)]
            row = (passing if len(passing) else frame).iloc[0].copy()
            row["located"] = bool(len(passing))
            rows.append(row)
        if not rows:
            return pd.DataFrame(columns=[*ranked.columns, "located"])
        return pd.DataFrame(rows).drop(columns=["rank"]).reset_index(drop=True)

    def location(self, target_variables: str, dataset_id: str | None = None) -> str | None:
        """The best cell's id for one group (its ``"+"``-joined name), or None when no cell carries it."""
        best = self.best_cells(dataset_id)
        rows = best[best["target_variables"] == target_variables]
        if rows.empty:
            raise KeyError(f"no scores for target variables {target_variables!r}")
        row = rows.iloc[0]
        return str(row["cell_id"]) if row["located"] else None

    def summary(self, top_k: int = 3) -> str:
        """Per group: its best cell or "no cell carries", then its ``top_k`` ranked cells; plus base accuracy."""
        lines: list[str] = []
        header = "interchange intervention accuracy"
        if self.metadata.get("experiment_id"):
            header += f" — experiment {self.metadata['experiment_id']!r}"
        if self.metadata.get("causal_model_id"):
            header += f", causal model {self.metadata['causal_model_id']!r}"
        lines.append(header)
        lines.append("  (IIA and floor over all pairs of all datasets, pooled; informative IIA on the pairs whose label "
                     "the interchange changes; best cell = highest informative IIA above its floor's 95% CI)")
        for row in self.base_accuracy.itertuples(index=False):
            lines.append(
                f"  base (no intervention) on {row.dataset_id}: {_fmt_acc(row.accuracy)} "
                f"({row.n_correct}/{row.n}, 95% CI {_fmt_ci(row.ci_low, row.ci_high)})"
            )
        best = self.best(top_k)
        located = self.best_cells().set_index("target_variables")
        n_cells = self.pooled().groupby("target_variables", sort=False).size().to_dict()
        for name, frame in best.groupby("target_variables", sort=False):
            where = located.loc[name]
            verdict = (f"carried by {where['cell_id']}" if where["located"] else
                       f"no cell carries {name}")
            lines.append(f"{name}: {verdict}; best {len(frame)} of {n_cells.get(name, 0)} cells")
            for row in frame.itertuples(index=False):
                head = "" if json_scalar(row.head) is None else f" head {int(row.head)}"
                if row.n_units > 1:
                    head += f" (+{row.n_units - 1} more units)"
                lines.append(f"  {row.cell_id} (layer {row.layer} {row.component}{head} @ {row.position_id}): "
                             + format_scores(row._asdict()))
        return "\n".join(lines)

    def verdicts(self, rule: VerdictRule | None = None, name: str | None = None) -> Verdicts:
        """The location verdicts of these scores (`causal.verdicts`: paired tests against the unpatched network,
        corrected across all (variable, cell) tests, pooled and per family)."""
        return verdicts_from_per_example(name or str(self.metadata.get("causal_model_id", "hypothesis")),
                                         self.per_example, rule, self.base_accuracy if len(self.base_accuracy) else None,
                                         list(dict.fromkeys(self.table["cell_id"])))

    def __repr__(self) -> str:
        return (
            f"InterchangeScores({len(self.target_variables)} groups, "
            f"{self.table['cell_id'].nunique() if not self.table.empty else 0} cells, "
            f"{self.table['dataset_id'].nunique() if not self.table.empty else 0} datasets)"
        )

    @staticmethod
    def per_example_path(path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
        return path.with_name(f"{stem}.per_example.parquet")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``path`` (JSON: table, pooled, best_cells, base_accuracy records) and ``<stem>.per_example.parquet``."""
        path = Path(path)
        parquet_path = self.per_example_path(path)
        atomic_write_parquet(parquet_path, self.per_example)
        atomic_write_json(
            path,
            {
                "metadata": {k: json_scalar(v) if not isinstance(v, (list, dict)) else v for k, v in self.metadata.items()},
                "target_variables": self.target_variables,
                "table": json_records(self.table),
                "pooled": json_records(self.pooled()),
                "best_cells": json_records(self.best_cells()),
                "base_accuracy": json_records(self.base_accuracy),
                "per_example_file": parquet_path.name,
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InterchangeScores:
        """Read scores written by `save`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no interchange scores at {path}")
        blob = json.loads(path.read_text())
        table = pd.DataFrame(blob["table"], columns=TABLE_COLUMNS)
        table["head"] = table["head"].astype("Int64")
        table["above_floor"] = table["above_floor"].fillna(False).astype(bool)
        per_example = pd.read_parquet(path.with_name(blob["per_example_file"]))
        base = pd.DataFrame(blob["base_accuracy"], columns=BASE_COLUMNS)
        return cls(table, per_example, base, blob.get("target_variables"), blob.get("metadata"))


def format_scores(row: Any) -> str:
    """``"informative IIA 0.812 (26/32, 95% CI [...]); IIA ...; floor ..."`` for one table row (mapping or Series)."""
    get = row.get if hasattr(row, "get") else row.__getitem__
    return (
        f"informative IIA {_fmt_acc(get('informative_accuracy'))} "
        f"({_fmt_int(get('n_informative_correct'))}/{_fmt_int(get('n_informative'))}, "
        f"95% CI {_fmt_ci(get('informative_ci_low'), get('informative_ci_high'))}); "
        f"IIA {_fmt_acc(get('accuracy'))} ({_fmt_int(get('n_correct'))}/{_fmt_int(get('n'))}, "
        f"95% CI {_fmt_ci(get('ci_low'), get('ci_high'))}); "
        f"floor {_fmt_acc(get('floor'))} (95% CI {_fmt_ci(get('floor_ci_low'), get('floor_ci_high'))})"
    )


def _fmt_int(value: Any) -> str:
    return "n/a" if json_scalar(value) is None else str(int(value))


def _fmt_acc(value: Any) -> str:
    value = json_scalar(value)
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_ci(low: Any, high: Any) -> str:
    low, high = json_scalar(low), json_scalar(high)
    if low is None or high is None:
        return "n/a"
    return f"[{low:.3f}, {high:.3f}]"


class _MemoChecker:
    """Caches ``checker(output, expected)`` per distinct pair; checkers must be pure functions."""

    def __init__(self, checker: Callable[[str, Any], bool]):
        self.checker = checker
        self.cache: dict[tuple[Any, Any], bool] = {}

    def __call__(self, output: str, expected: Any) -> bool:
        try:
            key = (output, type(expected), expected)
            hit = self.cache.get(key)
        except TypeError:  # unhashable label
            return self._run(output, expected)
        if hit is None:
            hit = self._run(output, expected)
            self.cache[key] = hit
        return hit

    def _run(self, output: str, expected: Any) -> bool:
        try:
            return bool(self.checker(output, expected))
        except Exception as exc:
            name = getattr(self.checker, "__name__", type(self.checker).__name__)
            raise ValueError(f"checker {name!r} raised {type(exc).__name__}: {exc} on output {output!r} with "
                             f"expected {expected!r}") from exc


def _check_rows(
    check: _MemoChecker,
    texts: list[Any],
    text_codes: np.ndarray,
    text_uniques: Any,
    labels: list[Any],
    indices: np.ndarray,
) -> np.ndarray:
    """``check(texts[r], labels[indices[r]])`` for every row r, calling the checker once per distinct pair."""
    if not len(indices):
        return np.zeros(0, dtype=bool)
    if all(type(label) is str for label in labels):
        label_codes, label_uniques = pd.factorize(np.asarray(labels, dtype=object))
        n_labels = len(label_uniques)
        pairs = text_codes.astype(np.int64) * n_labels + label_codes[indices].astype(np.int64)
        unique_pairs, inverse = np.unique(pairs, return_inverse=True)
        verdicts = np.fromiter(
            (bool(check.checker(text_uniques[u // n_labels], label_uniques[u % n_labels])) for u in unique_pairs),
            dtype=bool,
            count=len(unique_pairs),
        )
        return verdicts[inverse.reshape(-1)]
    return np.fromiter((check(t, labels[i]) for t, i in zip(texts, indices)), dtype=bool, count=len(indices))


def _differs(label: Any, base_label: Any) -> bool:
    """Whether an interchange label differs from the base label (by ``!=``; by ``str`` where ``!=`` is not a bool)."""
    try:
        return bool(label != base_label)
    except (TypeError, ValueError):
        return str(label) != str(base_label)


def compute_interchange_scores(
    raw_results: RawResults | str | os.PathLike[str],
    causal_model: CausalModel,
    datasets: CounterfactualDataset | list[CounterfactualDataset] | dict[str, CounterfactualDataset],
    target_variables_list: list[list[str]],
    checker: Callable[[str, Any], bool],
    include_pairs: bool = False,
    counterfactual_index: int | None = None,
) -> InterchangeScores:
    """Interchange intervention accuracy of every cell in ``raw_results`` for each target-variable group.

    Datasets are matched to the results by ``dataset.id`` (a dict must be keyed by those ids) and must have the fingerprint recorded in the manifest. Results datasets without
    a given dataset are not scored. For each group (variable names, ``"a<-b"`` allowed) and
    dataset, the expected output of example i is
    ``causal_model.run_interchange(input, {v: counterfactual_inputs[counterfactual_index] for v in group})["raw_output"]``,
    and a cell is correct on example i when ``checker(output_text, expected)``. The floor applies the
    checker to the unintervened output of example i instead; example i is informative when ``expected``
    differs from ``causal_model.label_data`` of its base input.
    ``include_pairs`` adds every pair of the single-variable groups as a joint group.
    ``counterfactual_index`` defaults to the one the experiment patched from (recorded in its manifest).
    """
    results, given = _results_and_datasets(raw_results, datasets)
    manifest = results.manifest
    recorded_index = int(manifest.settings.get("counterfactual_index", 0))
    if counterfactual_index is None:
        counterfactual_index = recorded_index
    elif counterfactual_index != recorded_index:
        raise ValueError(
            f"counterfactual_index={counterfactual_index} but the experiment patched from counterfactual "
            f"input #{recorded_index}; labels must come from the same counterfactual"
        )
    if RAW_OUTPUT not in causal_model.parents:
        raise ValueError(f"causal model {causal_model.id!r} has no {RAW_OUTPUT!r} variable to label with")
    groups = _normalize_groups(target_variables_list, include_pairs)
    for group in groups:
        for key in group:
            for var in parse_target(key):
                if var not in causal_model.parents:
                    raise ValueError(
                        f"target variable {var!r} (in group {group}) is not a variable of causal model {causal_model.id!r}"
                    )
    metadata = {
        "experiment_id": manifest.experiment_id,
        "experiment_type": manifest.experiment_type,
        "causal_model_id": causal_model.id,
        "model_name": manifest.model.get("name"),
        "counterfactual_index": counterfactual_index,
        "include_pairs": include_pairs,
        "results_root": str(results.root),
    }
    return _score_labels(
        results, given, [_group_name(g) for g in groups],
        lambda g, dataset: causal_model.label_counterfactual_data(dataset, groups[g], counterfactual_index),
        causal_model.label_data, checker, metadata, groups)


def _results_and_datasets(raw_results: RawResults | str | os.PathLike[str],
                          datasets: CounterfactualDataset | list[CounterfactualDataset] | dict[str, CounterfactualDataset],
                          ) -> tuple[RawResults, dict[str, CounterfactualDataset]]:
    """The results and the given datasets, each checked against the manifest (id and fingerprint)."""
    results = raw_results if isinstance(raw_results, RawResults) else RawResults(raw_results)
    manifest = results.manifest
    given = as_dataset_dict(datasets)
    records = {record.dataset_id: record for record in manifest.datasets}
    for dataset_id, dataset in given.items():
        if dataset_id not in records:
            raise ValueError(
                f"dataset {dataset_id!r} is not in the results at {results.root} "
                f"(experiment {manifest.experiment_id!r} has datasets {list(records)})"
            )
        record = records[dataset_id]
        fingerprint = dataset.fingerprint()
        if record.fingerprint != fingerprint:
            raise ValueError(
                f"dataset {dataset_id!r} does not match the one the results at {results.root} were computed on: "
                f"fingerprint {fingerprint[:12]}… != recorded {record.fingerprint[:12]}… "
                f"(size {len(dataset)} vs recorded {record.size}); regenerate it with the same seed or rerun the experiment"
            )
    return results, given


LabelSource = Callable[[CounterfactualDataset], Sequence[Any]] | Mapping[str, Sequence[Any]]


def _labels_from(source: LabelSource, dataset: CounterfactualDataset, what: str) -> list[Any]:
    labels = list(source[dataset.id] if isinstance(source, Mapping) else source(dataset))
    if len(labels) != len(dataset):
        raise ValueError(f"{what} gives {len(labels)} labels for dataset {dataset.id!r} of {len(dataset)} pairs")
    return labels


def score_labels(
    raw_results: RawResults | str | os.PathLike[str],
    datasets: CounterfactualDataset | list[CounterfactualDataset] | dict[str, CounterfactualDataset],
    labels: Mapping[str, LabelSource],
    checker: Callable[[str, Any], bool],
    base_labels: LabelSource | None = None,
    name: str = "labels",
) -> InterchangeScores:
    """Score raw results against labels given directly, no causal model needed: ``labels[variable]`` is a
    function of a dataset returning one expected output per pair, or a dict {dataset id: labels}.

    The same quantities as `compute_interchange_scores` (IIA, floor = the unpatched output against the same
    labels); ``base_labels`` (the hypothesis's labels of the unpatched inputs) gives the base accuracy and
    the label-based informative pairs (without it every pair counts as informative there). Controls
    (`causal.controls`) and hypotheses awkward to write as a graph are scored this way."""
    results, given = _results_and_datasets(raw_results, datasets)
    if not labels:
        raise ValueError("labels holds no variable")
    names = list(labels)
    sources = [labels[n] for n in names]
    metadata = {"experiment_id": results.manifest.experiment_id, "experiment_type": results.manifest.experiment_type,
                "causal_model_id": name, "model_name": results.manifest.model.get("name"),
                "results_root": str(results.root)}
    base_of = (lambda dataset: _labels_from(base_labels, dataset, "base_labels")) if base_labels is not None else None
    return _score_labels(results, given, names,
                         lambda g, dataset: _labels_from(sources[g], dataset, f"labels[{names[g]!r}]"),
                         base_of, checker, metadata, [[n] for n in names])


def _score_labels(results: RawResults, given: dict[str, CounterfactualDataset], group_names: list[str],
                  label_of: Callable[[int, CounterfactualDataset], Sequence[Any]],
                  base_label_of: Callable[[CounterfactualDataset], Sequence[Any]] | None,
                  checker: Callable[[str, Any], bool], metadata: dict[str, Any],
                  groups: list[list[str]]) -> InterchangeScores:
    """The scoring loop shared by `compute_interchange_scores` and `score_labels`."""
    manifest = results.manifest
    records = {record.dataset_id: record for record in manifest.datasets}
    check = _MemoChecker(checker)
    cell_order = {cell.cell_id: i for i, cell in enumerate(manifest.cells)}
    address = results.cell_addresses()

    scored_ids = [d for d in records if d in given]  # manifest order
    cell_ids = [cell.cell_id for cell in manifest.cells]
    n_groups, n_datasets, n_cells = len(groups), len(scored_ids), len(cell_ids)
    # per-row arrays, concatenated over (dataset, group) chunks and sorted once at the end
    chunks: dict[str, list[np.ndarray]] = {
        k: [] for k in ("g", "d", "c", "e", "expected", "text", "correct", "base_label", "informative", "floor")}
    base_rows: list[dict[str, Any]] = []
    for d_index, dataset_id in enumerate(scored_ids):
        dataset = given[dataset_id]
        size = len(dataset)
        outputs = results.intervened_outputs(dataset_id)
        indices = outputs["example_index"].to_numpy(dtype=np.int64) if len(outputs) else np.zeros(0, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= size):
            raise ResultsError(
                f"results for dataset {dataset_id!r} refer to example {int(indices.max())}, "
                f"but the dataset has {size} examples"
            )
        if len(outputs):
            cell_codes, cell_uniques = pd.factorize(np.asarray(outputs["cell_id"].tolist(), dtype=object))
            unknown = sorted(str(c) for c in cell_uniques if c not in cell_order)
            if unknown:
                raise ResultsError(
                    f"results for dataset {dataset_id!r} hold cells {unknown[:5]} missing from the manifest"
                )
            cell_index = np.asarray([cell_order[c] for c in cell_uniques], dtype=np.int64)[cell_codes]
        else:
            cell_index = np.zeros(0, dtype=np.int64)
        texts = outputs["output_text"].tolist() if len(outputs) else []
        text_array = np.asarray(texts, dtype=object)
        text_codes, text_uniques = pd.factorize(text_array, use_na_sentinel=False)

        base = results.base_outputs(dataset_id)
        base_labels = list(base_label_of(dataset)) if base_label_of is not None else [None] * size
        base_index = base["example_index"].to_numpy(dtype=np.int64) if len(base) else np.zeros(0, np.int64)
        bad = [int(i) for i in base_index if not 0 <= int(i) < size]
        if bad:
            raise ResultsError(
                f"base results for dataset {dataset_id!r} refer to example {bad[0]}, but the dataset has {size} examples"
            )
        has_base = np.zeros(size, dtype=bool)
        has_base[base_index] = True
        if len(indices) and not has_base[indices].all():
            missing = int(indices[~has_base[indices]][0])
            raise ResultsError(
                f"results for dataset {dataset_id!r} hold intervened outputs for example {missing} "
                f"but no base (unintervened) output for it: the floor cannot be computed"
            )
        base_texts = base["output_text"].tolist() if len(base) else []
        base_codes, base_uniques = pd.factorize(np.asarray(base_texts, dtype=object), use_na_sentinel=False)
        if base_label_of is not None:
            base_correct = _check_rows(check, base_texts, base_codes, base_uniques, base_labels, base_index)
            base_rows.append({"dataset_id": dataset_id, "n": len(base_correct), "n_correct": int(base_correct.sum())})

        for g_index in range(n_groups):
            labels = label_of(g_index, dataset)
            label_strings = np.asarray([str(label) for label in labels], dtype=object)
            # floor: the unintervened output of each example checked against its interchange label
            floor_example = np.zeros(size, dtype=bool)
            floor_example[base_index] = _check_rows(check, base_texts, base_codes, base_uniques, labels, base_index)
            informative_example = np.fromiter(
                (base_label_of is None or _differs(label, base_label) for label, base_label in zip(labels, base_labels)),
                dtype=bool, count=size)
            n_rows = len(indices)
            chunks["g"].append(np.full(n_rows, g_index, dtype=np.int64))
            chunks["d"].append(np.full(n_rows, d_index, dtype=np.int64))
            chunks["c"].append(cell_index)
            chunks["e"].append(indices)
            chunks["expected"].append(label_strings[indices])
            chunks["text"].append(text_array)
            chunks["correct"].append(_check_rows(check, texts, text_codes, text_uniques, labels, indices))
            chunks["base_label"].append(np.asarray([str(label) for label in base_labels], dtype=object)[indices])
            chunks["informative"].append(informative_example[indices])
            chunks["floor"].append(floor_example[indices])

    def joined(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate(chunks[key]) if chunks[key] else np.zeros(0, dtype=dtype)

    g_arr, d_arr, c_arr, e_arr = (joined(k, np.int64) for k in ("g", "d", "c", "e"))
    expected_arr, text_arr, correct_arr = joined("expected", object), joined("text", object), joined("correct", bool)
    base_label_arr, informative_arr, floor_arr = joined("base_label", object), joined("informative", bool), joined("floor", bool)
    order = np.lexsort((e_arr, c_arr, d_arr, g_arr))
    g_arr, d_arr, c_arr, e_arr = g_arr[order], d_arr[order], c_arr[order], e_arr[order]
    correct_arr = correct_arr[order].astype(bool)
    informative_arr, floor_arr = informative_arr[order].astype(bool), floor_arr[order].astype(bool)
    per_example = pd.DataFrame(
        {
            "target_variables": pd.Categorical.from_codes(g_arr, categories=group_names).astype(str)
            if len(g_arr) else np.zeros(0, dtype=object),
            "dataset_id": np.asarray(scored_ids, dtype=object)[d_arr] if len(d_arr) else np.zeros(0, dtype=object),
            "cell_id": np.asarray(cell_ids, dtype=object)[c_arr] if len(c_arr) else np.zeros(0, dtype=object),
            "example_index": e_arr,
            "expected": expected_arr[order],
            "output_text": text_arr[order],
            "correct": correct_arr,
            "base_label": base_label_arr[order],
            "informative": informative_arr,
            "base_correct_on_label": floor_arr,
        },
        columns=PER_EXAMPLE_COLUMNS,
    )

    # counts per (group, dataset, cell), in that order
    keys = (g_arr * n_datasets + d_arr) * n_cells + c_arr
    n_keys = n_groups * n_datasets * n_cells
    def count(weights: np.ndarray | None) -> np.ndarray:
        if not n_keys:
            return np.zeros(0, dtype=np.int64)
        counted = np.bincount(keys, weights=None if weights is None else weights.astype(np.int64), minlength=n_keys)
        return np.rint(counted).astype(np.int64)

    n = count(None)
    present = np.flatnonzero(n)
    counts = pd.DataFrame(
        {
            "target_variables": [group_names[int(x // (n_datasets * n_cells))] for x in present],
            "dataset_id": [scored_ids[int(x // n_cells % n_datasets)] for x in present],
            "cell_id": [cell_ids[int(x % n_cells)] for x in present],
            "n": n[present],
            "n_correct": count(correct_arr)[present],
            "floor_correct": count(floor_arr)[present],
            "n_informative": count(informative_arr)[present],
            "n_informative_correct": count(correct_arr & informative_arr)[present],
        }
    )
    table = counts.merge(address, on="cell_id", how="left", sort=False)
    table = _with_scores(table)[TABLE_COLUMNS].reset_index(drop=True)

    base_accuracy = _with_accuracy(pd.DataFrame(base_rows, columns=["dataset_id", "n", "n_correct"]))
    base_accuracy = base_accuracy[BASE_COLUMNS].reset_index(drop=True)
    return InterchangeScores(table, per_example, base_accuracy, groups, metadata)
