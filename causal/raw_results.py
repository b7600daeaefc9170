"""Raw intervention results on disk: a JSON manifest plus parquet tables. Torch-free.

Layout of a results folder::

    manifest.json                          # ResultsManifest: what produced the results
    base/<dataset_id>/part_00000.parquet   # one row per example: the unintervened output
    cells/<dataset_id>/part_00000.parquet  # one row per (cell, example): the intervened output

A *cell* is one intervention site: one or more model units (layer, component, head,
token position) patched together. Examples are processed in fixed parts of
``example_batch_size`` examples (part i holds examples [i*bs, (i+1)*bs)), each part over
every cell; cells are folded into forwards in the fixed ``cell_groups``. A part file is
written atomically once all its rows are done, so a killed run, rerun with the same
arguments, skips finished parts and recomputes the same batches, giving the same table.

Output columns (base and intervened tables alike):
``example_index`` (int), ``output_text`` (str, the generated continuation decoded without
special tokens), ``output_token_ids`` (list[int]), ``topk_token_ids`` (list[list[int]],
per generated step), ``topk_logits`` (list[list[float]]). Intervened tables also carry
``cell_id`` (str).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, ValidationError

FORMAT_VERSION = 2
"""2: cells record their intervention kind and parameters, units their featurizer (id, weights hash,
feature indices). Version-1 folders are read (their cells are interchanges through the identity)."""
MANIFEST_NAME = "manifest.json"

OUTPUT_COLUMNS = ["example_index", "output_text", "output_token_ids", "topk_token_ids", "topk_logits"]


class ResultsError(RuntimeError):
    """A results folder is missing, corrupted, or belongs to a different experiment."""


class UnitAddress(BaseModel):
    """Where one model unit lives: ``layer`` (-1 = embeddings), component, optional head, position id."""

    layer: int
    component: str
    head: int | None = None
    position_id: str
    featurizer_id: str = "identity"
    featurizer_sha256: str = ""
    feature_indices: list[int] | None = None


class CellSpec(BaseModel):
    """One intervention site: the units acted on together, the intervention ``kind`` and its parameters.

    Kinds: ``interchange`` (patch from the counterfactual input; the default), ``zero_ablation``,
    ``mean_ablation``, and the attention-level kinds of ``experiments.attention_control``.
    """

    cell_id: str
    units: list[UnitAddress]
    featurizer_id: str = "identity"
    kind: str = "interchange"
    parameters: dict[str, Any] = Field(default_factory=dict)


class DatasetRecord(BaseModel):
    dataset_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$", description="also a folder name")
    fingerprint: str
    size: int


class ResultsManifest(BaseModel):
    """Identity of an experiment. Two runs with equal ``identity()`` may share a folder."""

    format_version: int = FORMAT_VERSION
    experiment_id: str
    experiment_type: str
    model: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    datasets: list[DatasetRecord]
    cells: list[CellSpec]
    example_batch_size: int = Field(gt=0, description="examples per part (per results file)")
    cell_groups: list[list[str]] = Field(description="cell ids folded into the same forward passes")

    def n_parts(self, dataset_id: str) -> int:
        for record in self.datasets:
            if record.dataset_id == dataset_id:
                return -(-record.size // self.example_batch_size)
        raise KeyError(f"dataset {dataset_id!r} is not in this experiment")

    def identity(self) -> str:
        """Hash of everything that determines the results."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def cell(self, cell_id: str) -> CellSpec:
        for cell in self.cells:
            if cell.cell_id == cell_id:
                return cell
        raise KeyError(f"no cell {cell_id!r} in this experiment")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise ResultsError(
            f"results file {path} is corrupted ({type(exc).__name__}: {exc}). "
            f"Delete it and rerun the same command to recompute just that part."
        ) from exc


def part_file_name(index: int) -> str:
    return f"part_{index:05d}.parquet"


def part_path(root: Path, kind: str, dataset_id: str, part: int) -> Path:
    """``root/<kind>/<dataset_id>/part_NNNNN.parquet``; kind is "base" or "cells"."""
    return root / kind / dataset_id / part_file_name(part)


class RawResults:
    """Read access to a results folder (see module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.manifest = self.read_manifest(self.root)

    @staticmethod
    def read_manifest(root: Path) -> ResultsManifest:
        path = Path(root) / MANIFEST_NAME
        if not path.exists():
            raise ResultsError(f"{root} holds no {MANIFEST_NAME}: not a results folder (or the run never started)")
        try:
            return ResultsManifest.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as exc:
            raise ResultsError(f"{path} is corrupted or from an incompatible version: {exc}") from exc

    @property
    def dataset_ids(self) -> list[str]:
        return [record.dataset_id for record in self.manifest.datasets]

    def _check_dataset(self, dataset_id: str) -> None:
        if dataset_id not in self.dataset_ids:
            raise KeyError(f"dataset {dataset_id!r} is not in these results (have {self.dataset_ids})")

    def missing_parts(self, dataset_id: str) -> list[int]:
        """Parts of a dataset whose intervened rows are not on disk yet."""
        self._check_dataset(dataset_id)
        return [
            i for i in range(self.manifest.n_parts(dataset_id))
            if not (part_path(self.root, "base", dataset_id, i).exists() and part_path(self.root, "cells", dataset_id, i).exists())
        ]

    def is_complete(self) -> bool:
        return all(not self.missing_parts(d) for d in self.dataset_ids)

    def _read_parts(self, kind: str, dataset_id: str) -> pd.DataFrame:
        missing = self.missing_parts(dataset_id)
        if missing:
            raise ResultsError(
                f"results for dataset {dataset_id!r} in {self.root} are incomplete ({len(missing)} of "
                f"{self.manifest.n_parts(dataset_id)} parts missing); rerun the same command to resume"
            )
        frames = [_read_parquet(part_path(self.root, kind, dataset_id, i)) for i in range(self.manifest.n_parts(dataset_id))]
        return pd.concat(frames, ignore_index=True)

    def base_outputs(self, dataset_id: str) -> pd.DataFrame:
        """One row per example: the network's output without intervention."""
        return self._read_parts("base", dataset_id)

    def intervened_outputs(self, dataset_id: str | None = None) -> pd.DataFrame:
        """One row per (dataset, cell, example) with the cell's address columns.

        Columns: ``dataset_id``, ``cell_id``, ``layer``, ``component``, ``head``, ``position_id``
        (of the cell's first unit; ``n_units`` says how many it has) and the output columns.
        """
        ids = [dataset_id] if dataset_id is not None else self.dataset_ids
        frames = []
        for did in ids:
            frame = self._read_parts("cells", did)
            frame.insert(0, "dataset_id", did)
            frames.append(frame)
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["dataset_id", "cell_id"])
        return table.merge(self.cell_addresses(), on="cell_id", how="left")

    def cell_addresses(self) -> pd.DataFrame:
        """One row per cell in manifest order: ``cell_id``, ``layer``, ``component``, ``head`` (nullable int),
        ``position_id`` (of the cell's first unit) and ``n_units``."""
        frame = pd.DataFrame(
            [
                {
                    "cell_id": c.cell_id,
                    "layer": c.units[0].layer if c.units else None,
                    "component": c.units[0].component if c.units else None,
                    "head": c.units[0].head if c.units else None,
                    "position_id": c.units[0].position_id if c.units else None,
                    "n_units": len(c.units),
                }
                for c in self.manifest.cells
            ],
            columns=["cell_id", "layer", "component", "head", "position_id", "n_units"],
        )
        frame["head"] = frame["head"].astype("Int64")
        return frame


class RawResultsWriter:
    """Creates or resumes a results folder. Refuses a folder that holds a different experiment."""

    def __init__(self, root: str | os.PathLike[str], manifest: ResultsManifest):
        self.root = Path(root)
        self.manifest = manifest
        manifest_path = self.root / MANIFEST_NAME
        if manifest_path.exists():
            existing = RawResults.read_manifest(self.root)
            if existing.identity() != manifest.identity():
                old, new = existing.model_dump(mode="json"), manifest.model_dump(mode="json")
                differ = sorted(k for k in new if old.get(k) != new[k])
                details = [f"{k}.{kk}" for k in ("model", "settings") if k in differ
                           for kk in sorted(set(old[k]) | set(new[k])) if old[k].get(kk) != new[k].get(kk)]
                raise ResultsError(
                    f"{self.root} already holds results of a different experiment "
                    f"(experiment_id={existing.experiment_id!r}; differing: {', '.join(details + differ)}); "
                    f"use another results folder, or delete this one to start over"
                )
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise ResultsError(
                    f"{self.root} is not empty but holds no {MANIFEST_NAME}: refusing to mix new results with "
                    f"files of unknown origin; use an empty or new folder"
                )
            atomic_write_json(manifest_path, manifest.model_dump(mode="json"))

    def has_part(self, dataset_id: str, part: int) -> bool:
        return all(part_path(self.root, kind, dataset_id, part).exists() for kind in ("base", "cells"))

    def write_part(
        self, dataset_id: str, part: int, base_rows: Iterable[dict[str, Any]], cell_rows: Iterable[dict[str, Any]]
    ) -> None:
        """Write one part: base rows first, intervened rows last (the latter marks the part done)."""
        atomic_write_parquet(
            part_path(self.root, "base", dataset_id, part), pd.DataFrame(list(base_rows), columns=OUTPUT_COLUMNS)
        )
        atomic_write_parquet(
            part_path(self.root, "cells", dataset_id, part),
            pd.DataFrame(list(cell_rows), columns=["cell_id", *OUTPUT_COLUMNS]),
        )

    def results(self) -> RawResults:
        return RawResults(self.root)
