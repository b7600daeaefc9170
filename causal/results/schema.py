"""The results format's schema: versions, errors and the pydantic records of a results folder. Torch-free.

``ResultsManifest`` (with its ``DatasetRecord``, ``CellSpec`` and ``UnitAddress``) says what produced a folder;
``PartRecord`` / ``BlockRecord`` (with one ``FileRecord`` per parquet file) say what a finished part or cell
block holds; ``DamagedPart`` names a part that fails its checks. ``ResultsError`` is raised for missing, corrupted
or foreign results, ``ResultsLockedError`` for a folder held by another writer, ``ResultsWarning`` for a folder
that can be read but not fully verified.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 2
"""2: cells record their intervention kind and parameters, units their featurizer (id, weights hash,
feature indices). Version-1 folders are read (their cells are interchanges through the identity)."""
PART_RECORD_VERSION = 1


class ResultsError(RuntimeError):
    """A results folder is missing, corrupted, or belongs to a different experiment."""


class ResultsLockedError(ResultsError):
    """Another writer holds the results folder."""


class ResultsWarning(UserWarning):
    """A results folder can be read but not fully verified (written before part records existed)."""


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
    ``mean_ablation``, and the attention-level kinds of ``experiments.backends.attention_control``.
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
        return -(-self.dataset(dataset_id).size // self.example_batch_size)

    def dataset(self, dataset_id: str) -> DatasetRecord:
        for record in self.datasets:
            if record.dataset_id == dataset_id:
                return record
        raise KeyError(f"dataset {dataset_id!r} is not in this experiment")

    def part_indices(self, dataset_id: str, part: int) -> list[int]:
        """Example indices of one part: [part*bs, min(size, (part+1)*bs))."""
        bs, size = self.example_batch_size, self.dataset(dataset_id).size
        return list(range(part * bs, min(size, (part + 1) * bs)))

    def identity(self) -> str:
        """Hash of everything that determines the results."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def producer_sha256(self) -> str:
        """Hash of what produced the rows (experiment id and type, model, settings); kept in every part record."""
        blob = json.dumps(
            {"experiment_id": self.experiment_id, "experiment_type": self.experiment_type,
             "model": self.model, "settings": self.settings},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def cell(self, cell_id: str) -> CellSpec:
        for cell in self.cells:
            if cell.cell_id == cell_id:
                return cell
        raise KeyError(f"no cell {cell_id!r} in this experiment")


class FileRecord(BaseModel):
    """One parquet file of a part: path relative to the folder, byte count, sha256 of the bytes, row count."""

    model_config = ConfigDict(extra="forbid")

    path: str
    n_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    n_rows: int = Field(ge=0)


class PartRecord(BaseModel):
    """What one finished part holds; written after its parquet files (``parts/<dataset_id>/part_NNNNN.json``)."""

    model_config = ConfigDict(extra="forbid")

    part_record_version: int = PART_RECORD_VERSION
    dataset_id: str
    dataset_fingerprint: str
    part: int = Field(ge=0)
    example_indices: list[int]
    cell_ids: list[str]
    producer_sha256: str
    files: dict[Literal["base", "cells"], FileRecord]


class BlockRecord(PartRecord):
    """A finished cell block of a part (cell-range shards): ``cell_ids`` are the block's cells, the files
    live under ``blocks/``. Block ``block`` of ``n_blocks``."""

    block: int = Field(ge=0)
    n_blocks: int = Field(ge=1)


class DamagedPart(BaseModel):
    """A part on disk that fails its checks: the culprit ``path`` and why."""

    dataset_id: str
    part: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"part {self.part} of dataset {self.dataset_id!r} ({self.path}): {self.reason}"
