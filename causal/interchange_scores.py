"""Score raw interchange-intervention results against a causal model. Torch-free.

`compute_interchange_scores` reads a results folder (see `causal.raw_results`), labels each
counterfactual example with the causal model's output under an interchange of each group
of target variables, and applies a checker to every intervened output: the interchange
intervention accuracy (IIA) of each cell, with 95% Wilson score intervals.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from causal.causal_model import RAW_OUTPUT, CausalModel, parse_target
from causal.counterfactual_dataset import CounterfactualDataset, as_dataset_dict
from causal.raw_results import RawResults, ResultsError, atomic_write_json, atomic_write_parquet

Z_95 = 1.959963984540054

ADDRESS_COLUMNS = ["layer", "component", "head", "position_id"]
TABLE_COLUMNS = ["target_variables", "dataset_id", "cell_id", *ADDRESS_COLUMNS, "n_units", "n", "n_correct",
                 "accuracy", "ci_low", "ci_high"]
PER_EXAMPLE_COLUMNS = ["target_variables", "dataset_id", "cell_id", "example_index", "expected", "output_text",
                       "correct"]
BASE_COLUMNS = ["dataset_id", "n", "n_correct", "accuracy", "ci_low", "ci_high"]


def wilson_interval(successes: int | np.ndarray, n: int | np.ndarray, z: float = Z_95) -> tuple[Any, Any]:
    """Wilson score interval for a binomial proportion (NaN where ``n == 0``). Works on arrays."""
    k = np.asarray(successes, dtype=float)
    total = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / total
        z2 = z * z
        denominator = 1 + z2 / total
        center = (p + z2 / (2 * total)) / denominator
        half = z * np.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denominator
        low = np.clip(center - half, 0.0, 1.0)
        high = np.clip(center + half, 0.0, 1.0)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def _with_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    n = frame["n"].to_numpy()
    k = frame["n_correct"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["accuracy"] = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    low, high = wilson_interval(k, n)
    frame["ci_low"] = low
    frame["ci_high"] = high
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


def _clean(value: Any) -> Any:
    """JSON-safe scalar: numpy -> python, NaN/NA -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


class InterchangeScores:
    """Interchange intervention accuracies (IIA) of every (target-variable group, dataset, cell).

    ``table``: one row per (target_variables, dataset_id, cell_id) with the cell's address
    (of its first unit), ``n``, ``n_correct``, ``accuracy``, ``ci_low``, ``ci_high`` (95% Wilson).
    ``per_example``: one row per (group, dataset, cell, example). ``base_accuracy``: the checker
    on unintervened outputs per dataset. ``averaged()``: pooled over datasets.
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

    def averaged(self) -> pd.DataFrame:
        """One row per (target_variables, cell_id): counts pooled over all examples of all datasets."""
        if self.table.empty:
            return pd.DataFrame(columns=[c for c in TABLE_COLUMNS if c != "dataset_id"])
        keys = ["target_variables", "cell_id"]
        first = self.table.groupby(keys, sort=False)[[*ADDRESS_COLUMNS, "n_units"]].first()
        sums = self.table.groupby(keys, sort=False)[["n", "n_correct"]].sum()
        frame = first.join(sums).reset_index()
        frame = _with_accuracy(frame)
        return frame[[c for c in TABLE_COLUMNS if c != "dataset_id"]]

    def best(self, top_k: int = 3) -> pd.DataFrame:
        """The ``top_k`` cells of each group by pooled accuracy (ties: manifest order)."""
        averaged = self.averaged()
        averaged["_order"] = range(len(averaged))
        ranked = averaged.sort_values(["accuracy", "_order"], ascending=[False, True], kind="stable",
                                      na_position="last")
        group_order = {name: i for i, name in enumerate(dict.fromkeys(averaged["target_variables"]))}
        ranked = ranked.groupby("target_variables", sort=False).head(top_k)
        ranked = ranked.assign(_group=ranked["target_variables"].map(group_order))
        ranked = ranked.sort_values(["_group", "accuracy", "_order"], ascending=[True, False, True], kind="stable")
        return ranked.drop(columns=["_order", "_group"]).reset_index(drop=True)

    def summary(self, top_k: int = 3) -> str:
        """Per target-variable group, its best cells (pooled accuracy with 95% CI), plus base accuracy."""
        lines: list[str] = []
        header = "interchange intervention accuracy"
        if self.metadata.get("experiment_id"):
            header += f" — experiment {self.metadata['experiment_id']!r}"
        if self.metadata.get("causal_model_id"):
            header += f", causal model {self.metadata['causal_model_id']!r}"
        lines.append(header)
        for row in self.base_accuracy.itertuples(index=False):
            lines.append(
                f"  base (no intervention) on {row.dataset_id}: {_fmt_acc(row.accuracy)} "
                f"({row.n_correct}/{row.n}, 95% CI {_fmt_ci(row.ci_low, row.ci_high)})"
            )
        best = self.best(top_k)
        averaged = self.averaged()
        n_cells = averaged.groupby("target_variables", sort=False).size().to_dict()
        for name, frame in best.groupby("target_variables", sort=False):
            lines.append(f"{name}: best {len(frame)} of {n_cells.get(name, 0)} cells")
            for row in frame.itertuples(index=False):
                head = "" if _clean(row.head) is None else f" head {int(row.head)}"
                if row.n_units > 1:
                    head += f" (+{row.n_units - 1} more units)"
                lines.append(
                    f"  {row.cell_id} (layer {row.layer} {row.component}{head} @ {row.position_id}): "
                    f"{_fmt_acc(row.accuracy)} ({row.n_correct}/{row.n}, 95% CI {_fmt_ci(row.ci_low, row.ci_high)})"
                )
        return "\n".join(lines)

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
        """Write ``path`` (JSON: table, averaged, base_accuracy records) and ``<stem>.per_example.parquet`` beside it."""
        path = Path(path)
        parquet_path = self.per_example_path(path)
        atomic_write_parquet(parquet_path, self.per_example)
        atomic_write_json(
            path,
            {
                "metadata": {k: _clean(v) if not isinstance(v, (list, dict)) else v for k, v in self.metadata.items()},
                "target_variables": self.target_variables,
                "table": _records(self.table),
                "averaged": _records(self.averaged()),
                "base_accuracy": _records(self.base_accuracy),
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
        per_example = pd.read_parquet(path.with_name(blob["per_example_file"]))
        base = pd.DataFrame(blob["base_accuracy"], columns=BASE_COLUMNS)
        return cls(table, per_example, base, blob.get("target_variables"), blob.get("metadata"))


def _fmt_acc(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _fmt_ci(low: float, high: float) -> str:
    if low is None or (isinstance(low, float) and math.isnan(low)):
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
            return bool(self.checker(output, expected))
        if hit is None:
            hit = bool(self.checker(output, expected))
            self.cache[key] = hit
        return hit


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
    and a cell is correct on example i when ``checker(output_text, expected)``.
    ``include_pairs`` adds every pair of the single-variable groups as a joint group.
    ``counterfactual_index`` defaults to the one the experiment patched from (recorded in its manifest).
    """
    results = raw_results if isinstance(raw_results, RawResults) else RawResults(raw_results)
    manifest = results.manifest
    recorded_index = int(manifest.settings.get("counterfactual_index", 0))
    if counterfactual_index is None:
        counterfactual_index = recorded_index
    elif counterfactual_index != recorded_index:
        raise ValueError(
            f"counterfactual_index={counterfactual_index} but the experiment patched from counterfactual "
            f"input #{recorded_index}; labels must come from the same counterfactual"
        )
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

    check = _MemoChecker(checker)
    cell_order = {cell.cell_id: i for i, cell in enumerate(manifest.cells)}
    address = results.cell_addresses()

    scored_ids = [d for d in records if d in given]  # manifest order
    cell_ids = [cell.cell_id for cell in manifest.cells]
    group_names = [_group_name(g) for g in groups]
    n_groups, n_datasets, n_cells = len(groups), len(scored_ids), len(cell_ids)
    # per-row arrays, concatenated over (dataset, group) chunks and sorted once at the end
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("g", "d", "c", "e", "expected", "text", "correct")}
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
        base_labels = causal_model.label_data(dataset)
        bad = [int(i) for i in base["example_index"] if not 0 <= int(i) < size]
        if bad:
            raise ResultsError(
                f"base results for dataset {dataset_id!r} refer to example {bad[0]}, but the dataset has {size} examples"
            )
        base_correct = [
            check(text, base_labels[int(i)]) for i, text in zip(base["example_index"], base["output_text"])
        ]
        base_rows.append({"dataset_id": dataset_id, "n": len(base_correct), "n_correct": int(sum(base_correct))})

        for g_index, group in enumerate(groups):
            labels = causal_model.label_counterfactual_data(dataset, group, counterfactual_index)
            label_strings = np.asarray([str(label) for label in labels], dtype=object)
            n_rows = len(indices)
            chunks["g"].append(np.full(n_rows, g_index, dtype=np.int64))
            chunks["d"].append(np.full(n_rows, d_index, dtype=np.int64))
            chunks["c"].append(cell_index)
            chunks["e"].append(indices)
            chunks["expected"].append(label_strings[indices])
            chunks["text"].append(text_array)
            chunks["correct"].append(_check_rows(check, texts, text_codes, text_uniques, labels, indices))

    def joined(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate(chunks[key]) if chunks[key] else np.zeros(0, dtype=dtype)

    g_arr, d_arr, c_arr, e_arr = (joined(k, np.int64) for k in ("g", "d", "c", "e"))
    expected_arr, text_arr, correct_arr = joined("expected", object), joined("text", object), joined("correct", bool)
    order = np.lexsort((e_arr, c_arr, d_arr, g_arr))
    g_arr, d_arr, c_arr, e_arr = g_arr[order], d_arr[order], c_arr[order], e_arr[order]
    correct_arr = correct_arr[order].astype(bool)
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
        },
        columns=PER_EXAMPLE_COLUMNS,
    )

    # counts per (group, dataset, cell), in that order
    keys = (g_arr * n_datasets + d_arr) * n_cells + c_arr
    n_keys = n_groups * n_datasets * n_cells
    n = np.bincount(keys, minlength=n_keys) if n_keys else np.zeros(0, dtype=np.int64)
    k = np.bincount(keys, weights=correct_arr.astype(np.int64), minlength=n_keys) if n_keys else np.zeros(0)
    present = np.flatnonzero(n)
    counts = pd.DataFrame(
        {
            "target_variables": [group_names[int(x // (n_datasets * n_cells))] for x in present],
            "dataset_id": [scored_ids[int(x // n_cells % n_datasets)] for x in present],
            "cell_id": [cell_ids[int(x % n_cells)] for x in present],
            "n": n[present].astype(np.int64),
            "n_correct": np.rint(k[present]).astype(np.int64),
        }
    )
    table = counts.merge(address, on="cell_id", how="left", sort=False)
    table = _with_accuracy(table)[TABLE_COLUMNS].reset_index(drop=True)

    base_accuracy = _with_accuracy(pd.DataFrame(base_rows, columns=["dataset_id", "n", "n_correct"]))
    base_accuracy = base_accuracy[BASE_COLUMNS].reset_index(drop=True)
    metadata = {
        "experiment_id": manifest.experiment_id,
        "experiment_type": manifest.experiment_type,
        "causal_model_id": causal_model.id,
        "counterfactual_index": counterfactual_index,
        "include_pairs": include_pairs,
        "results_root": str(results.root),
    }
    return InterchangeScores(table, per_example, base_accuracy, groups, metadata)
