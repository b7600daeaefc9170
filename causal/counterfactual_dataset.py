"""`CounterfactualDataset`: base inputs paired with counterfactual inputs. Torch-free.

Each example is ``{"input": setting, "counterfactual_inputs": [setting, ...]}`` where a
*setting* is a dict of causal-model variable values (normally the input variables plus
``raw_input``). The examples live in an HF `datasets.Dataset` with a struct column ``input``
and a list-of-struct column ``counterfactual_inputs``. All settings of a dataset share
one key set, so values round-trip through Arrow with their types (ints stay ints, strs
stay strs) and no filler keys appear.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
from datasets import Dataset, Features

from causal.results import atomic_write_json

INPUT = "input"
COUNTERFACTUALS = "counterfactual_inputs"
SIDECAR_NAME = "counterfactual_dataset.json"
SIDECAR_FORMAT = 1


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    import datasets.utils as hf_utils

    was_disabled = hf_utils.are_progress_bars_disabled()
    hf_utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            hf_utils.enable_progress_bars()


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def _check_column_types(dataset: Dataset, where: str) -> None:
    schema = dataset.data.schema
    names = schema.names
    for column in (INPUT, COUNTERFACTUALS):
        if column not in names:
            raise ValueError(f"{where}: the dataset has no {column!r} column (columns: {names})")
    input_type = schema.field(INPUT).type
    if not pa.types.is_struct(input_type):
        raise ValueError(f"{where}: column {INPUT!r} must hold dict settings (an Arrow struct), not {input_type}")
    cf_type = schema.field(COUNTERFACTUALS).type
    is_list = pa.types.is_list(cf_type) or pa.types.is_large_list(cf_type) or pa.types.is_fixed_size_list(cf_type)
    if not (is_list and pa.types.is_struct(cf_type.value_type)):
        raise ValueError(
            f"{where}: column {COUNTERFACTUALS!r} must hold lists of dict settings (a list of Arrow structs), not {cf_type}"
        )


class CounterfactualDataset:
    """An HF dataset of ``{"input": setting, "counterfactual_inputs": [settings]}`` examples plus an ``id``."""

    def __init__(self, dataset: Dataset, id: str = "dataset"):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
        if not isinstance(id, str) or not id:
            raise ValueError(f"dataset id must be a non-empty string (got {id!r})")
        _check_column_types(dataset, f"dataset {id!r}")
        self.dataset = dataset
        self.id = id
        self._cache: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, data: dict[str, list[Any]], id: str = "dataset") -> CounterfactualDataset:
        """From ``{"input": [setting, ...], "counterfactual_inputs": [[setting, ...], ...]}``."""
        for column in (INPUT, COUNTERFACTUALS):
            if column not in data:
                raise ValueError(f"from_dict: missing key {column!r} (got keys {list(data)})")
        inputs = list(data[INPUT])
        counterfactuals = [list(cfs) for cfs in data[COUNTERFACTUALS]]
        if len(inputs) != len(counterfactuals):
            raise ValueError(
                f"from_dict: {len(inputs)} inputs but {len(counterfactuals)} counterfactual_inputs lists"
            )
        return cls._build(inputs, counterfactuals, id)

    @classmethod
    def from_examples(cls, examples: list[dict[str, Any]], id: str = "dataset") -> CounterfactualDataset:
        """From a list of ``{"input": setting, "counterfactual_inputs": [settings]}`` dicts."""
        inputs, counterfactuals = [], []
        for i, example in enumerate(examples):
            if not isinstance(example, dict) or INPUT not in example or COUNTERFACTUALS not in example:
                raise ValueError(
                    f"example {i} must be a dict with keys {INPUT!r} and {COUNTERFACTUALS!r} (got {example!r:.200})"
                )
            inputs.append(example[INPUT])
            counterfactuals.append(list(example[COUNTERFACTUALS]))
        return cls._build(inputs, counterfactuals, id)

    @classmethod
    def from_sampler(
        cls,
        size: int,
        sampler: Callable[[], dict[str, Any]],
        filter: Callable[[dict[str, Any]], bool] | None = None,
        id: str = "dataset",
        max_attempts: int | None = None,
    ) -> CounterfactualDataset:
        """Call ``sampler()`` (-> ``{"input": ..., "counterfactual_inputs": [...]}``) until ``size`` examples pass ``filter``.

        Gives up with a RuntimeError after ``max_attempts`` calls (default ``100 * size + 10_000``).
        """
        if size < 1:
            raise ValueError(f"size must be at least 1 (got {size})")
        limit = max_attempts if max_attempts is not None else 100 * size + 10_000
        examples: list[dict[str, Any]] = []
        attempts = 0
        while len(examples) < size:
            if attempts >= limit:
                raise RuntimeError(
                    f"from_sampler({id!r}): only {len(examples)} of {size} examples passed the filter in "
                    f"{attempts} samples; the filter is too strict or the sampler too narrow"
                )
            attempts += 1
            example = sampler()
            if filter is None or filter(example):
                examples.append(example)
        return cls.from_examples(examples, id=id)

    @classmethod
    def _build(cls, inputs: list[Any], counterfactuals: list[list[Any]], id: str) -> CounterfactualDataset:
        if not inputs:
            raise ValueError(f"dataset {id!r}: needs at least one example")
        settings: list[tuple[str, dict[str, Any]]] = []
        for i, (setting, cfs) in enumerate(zip(inputs, counterfactuals)):
            settings.append((f"example {i} input", setting))
            settings.extend((f"example {i} counterfactual_inputs[{j}]", cf) for j, cf in enumerate(cfs))
        keys: list[str] | None = None
        for where, setting in settings:
            if not isinstance(setting, dict):
                raise ValueError(f"dataset {id!r}: {where} is not a dict setting (got {type(setting).__name__})")
            if keys is None:
                keys = list(setting)
                if not keys:
                    raise ValueError(f"dataset {id!r}: {where} is an empty setting")
                bad = [k for k in keys if not isinstance(k, str)]
                if bad:
                    raise ValueError(f"dataset {id!r}: setting keys must be strings, got {bad}")
            elif set(setting) != set(keys):
                missing = sorted(set(keys) - set(setting))
                extra = sorted(set(setting) - set(keys))
                raise ValueError(
                    f"dataset {id!r}: all settings must share one key set; {where} "
                    f"lacks {missing} and has extra {extra} compared with example 0 input"
                )
        assert keys is not None
        fields = []
        for key in keys:
            column = [setting[key] for _, setting in settings]
            try:
                arrow_type = pa.array(column).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as exc:
                kinds = sorted({type(v).__name__ for v in column})
                raise ValueError(
                    f"dataset {id!r}: the values of variable {key!r} cannot be stored in one Arrow column "
                    f"(python types {kinds}): {exc}"
                ) from exc
            fields.append(pa.field(key, arrow_type))
        struct = pa.struct(fields)
        schema = pa.schema([pa.field(INPUT, struct), pa.field(COUNTERFACTUALS, pa.list_(struct))])
        ordered_inputs = [{k: s[k] for k in keys} for s in inputs]
        ordered_cfs = [[{k: s[k] for k in keys} for s in cfs] for cfs in counterfactuals]
        dataset = Dataset.from_dict(
            {INPUT: ordered_inputs, COUNTERFACTUALS: ordered_cfs}, features=Features.from_arrow_schema(schema)
        )
        return cls(dataset, id=id)

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.dataset)

    def _iter_examples(self) -> list[dict[str, Any]]:
        """The examples as plain Python (cached; do not mutate)."""
        if self._cache is None:
            self._cache = self.dataset.to_list()
        return self._cache

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"CounterfactualDataset indices must be integers (got {type(index).__name__})")
        example = self._iter_examples()[index]
        return {INPUT: dict(example[INPUT]), COUNTERFACTUALS: [dict(cf) for cf in example[COUNTERFACTUALS]]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def to_list(self) -> list[dict[str, Any]]:
        return [self[i] for i in range(len(self))]

    def __repr__(self) -> str:
        return f"CounterfactualDataset(id={self.id!r}, {len(self)} examples)"

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of ``[[input, counterfactual_inputs], ...]``; stable across save/load."""
        payload = [[ex[INPUT], ex[COUNTERFACTUALS]] for ex in self._iter_examples()]
        return hashlib.sha256(_canonical_json(payload).encode()).hexdigest()

    def display(self, n: int = 5) -> None:
        """Print the first ``n`` examples (their ``raw_input`` when present, else the whole setting)."""
        print(f"{self!r}")
        for i in range(min(n, len(self))):
            example = self._iter_examples()[i]
            print(f"[{i}] input: {_show(example[INPUT])}")
            for j, cf in enumerate(example[COUNTERFACTUALS]):
                print(f"    counterfactual {j}: {_show(cf)}")

    # ------------------------------------------------------------------ disk

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the dataset (HF ``save_to_disk``) and a sidecar JSON with its id and fingerprint.

        The folder is written beside ``path`` and moved into place, so ``path`` holds either the
        old dataset or the whole new one. An existing ``path`` must be a saved dataset or empty.
        """
        target = Path(path)
        if target.exists():
            if not target.is_dir():
                raise ValueError(f"cannot save dataset to {target}: it exists and is not a folder")
            contents = list(target.iterdir())
            if contents and not (target / SIDECAR_NAME).exists() and not (target / "dataset_info.json").exists():
                raise ValueError(f"cannot save dataset to {target}: it is a non-empty folder that holds no saved dataset")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            data_dir = tmp / "data"
            with _quiet_progress():
                self.dataset.save_to_disk(str(data_dir))
            atomic_write_json(
                data_dir / SIDECAR_NAME,
                {"format": SIDECAR_FORMAT, "id": self.id, "fingerprint": self.fingerprint(), "size": len(self)},
            )
            if target.exists():
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
                os.replace(target, old / "dataset")
                os.replace(data_dir, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(data_dir, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], id: str | None = None) -> CounterfactualDataset:
        """Read a dataset written by `save` (or any HF dataset folder with the two columns).

        ``id`` defaults to the saved id (else the folder name). Raises FileNotFoundError for a
        missing path and ValueError for a missing or mistyped column or a fingerprint mismatch.
        """
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"no saved counterfactual dataset at {folder}")
        sidecar: dict[str, Any] = {}
        sidecar_path = folder / SIDECAR_NAME
        if sidecar_path.exists():
            try:
                sidecar = json.loads(sidecar_path.read_text())
            except ValueError as exc:
                raise ValueError(f"{sidecar_path} is corrupted: {exc}") from exc
        try:
            dataset = Dataset.load_from_disk(str(folder))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{folder} does not hold a saved HF dataset ({exc})") from exc
        except Exception as exc:  # damaged arrow/state files raise pyarrow, json and datasets errors
            raise ValueError(
                f"the saved dataset in {folder} is corrupted ({type(exc).__name__}: {exc}); regenerate it"
            ) from exc
        dataset_id = id if id is not None else sidecar.get("id", folder.name)
        _check_column_types(dataset, f"dataset at {folder}")
        result = cls(dataset, id=dataset_id)
        saved_fp = sidecar.get("fingerprint")
        if saved_fp is not None and saved_fp != result.fingerprint():
            raise ValueError(
                f"dataset at {folder} does not match the fingerprint saved with it: its files were changed or damaged"
            )
        return result


def _show(setting: dict[str, Any]) -> str:
    if "raw_input" in setting:
        return repr(setting["raw_input"])
    return repr(setting)


def as_dataset_dict(
    datasets: "CounterfactualDataset | Sequence[CounterfactualDataset] | Mapping[str, CounterfactualDataset]",
) -> dict[str, "CounterfactualDataset"]:
    """One dataset, a list, or a dict keyed by dataset id, as ``{dataset.id: dataset}`` (ids unique)."""
    if isinstance(datasets, CounterfactualDataset):
        return {datasets.id: datasets}
    items = list(datasets.items()) if isinstance(datasets, Mapping) else [(getattr(d, "id", None), d) for d in datasets]
    result: dict[str, CounterfactualDataset] = {}
    for key, dataset in items:
        if not isinstance(dataset, CounterfactualDataset):
            raise TypeError(f"expected a CounterfactualDataset for {key!r}, got {type(dataset).__name__}")
        if key != dataset.id:
            raise ValueError(f"dataset under key {key!r} has id {dataset.id!r}; key datasets by their id")
        if key in result:
            raise ValueError(f"two datasets have the id {key!r}")
        result[key] = dataset
    if not result:
        raise ValueError("no datasets given")
    return result
