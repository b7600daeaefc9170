"""Reading a results folder: ``RawResults`` verifies every part it reads against its record and the manifest. Torch-free.

A part is finished once its record exists; reading it checks the record against the manifest (dataset
fingerprint, part, producer, cells, examples) and the file (bytes, sha256, rows, content), and a failure raises
``ResultsError`` naming the damaged file. ``verify()`` lists every damaged part without raising. Folders
written before part records existed are read through ``causal.results.legacy``, cell blocks of cell-range shards
through ``causal.results.shards``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from causal.results import legacy, shards
from causal.results.atomic import parse_parquet
from causal.results.layout import MANIFEST_NAME, PART_KINDS, part_path, part_record_path, relative_path
from causal.results.schema import (
    FORMAT_VERSION,
    PART_RECORD_VERSION,
    BlockRecord,
    DamagedPart,
    PartRecord,
    ResultsError,
    ResultsManifest,
)
from causal.results.tables import content_problem, describe_indices


class RawResults:
    """Read access to a results folder (see ``causal.results`` for the layout); every part read is verified."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.manifest = self.read_manifest(self.root)
        self._warned_legacy = False

    @staticmethod
    def read_manifest(root: Path) -> ResultsManifest:
        path = Path(root) / MANIFEST_NAME
        if not path.exists():
            raise ResultsError(f"{root} holds no {MANIFEST_NAME}: not a results folder (or the run never started)")
        try:
            manifest = ResultsManifest.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as exc:
            raise ResultsError(f"{path} is corrupted or from an incompatible version: {exc}") from exc
        if manifest.format_version > FORMAT_VERSION:
            raise ResultsError(
                f"{path} was written in results format {manifest.format_version}, newer than this version reads "
                f"({FORMAT_VERSION}): update the framework to read it"
            )
        return manifest

    @property
    def dataset_ids(self) -> list[str]:
        return [record.dataset_id for record in self.manifest.datasets]

    @property
    def has_part_records(self) -> bool:
        """False for folders written before part records existed: their parts cannot be verified by hash."""
        return legacy.has_part_records(self.root)

    def _check_dataset(self, dataset_id: str) -> None:
        if dataset_id not in self.dataset_ids:
            raise KeyError(f"dataset {dataset_id!r} is not in these results (have {self.dataset_ids})")

    def _warn_legacy(self) -> None:
        if not self.has_part_records and not self._warned_legacy:
            self._warned_legacy = True
            legacy.warn_unverifiable(self.root, stacklevel=3)

    def is_finished(self, dataset_id: str, part: int) -> bool:
        """The part's writer got to its end: its record exists (before part records: both parquet files do)."""
        if self.has_part_records:
            return part_record_path(self.root, dataset_id, part).exists()
        return legacy.finished_without_record(self.root, dataset_id, part)

    def missing_parts(self, dataset_id: str) -> list[int]:
        """Parts of a dataset that are not finished (not written yet, or their write was interrupted)."""
        self._check_dataset(dataset_id)
        return [i for i in range(self.manifest.n_parts(dataset_id)) if not self.is_finished(dataset_id, i)]

    def is_complete(self) -> bool:
        return all(not self.missing_parts(d) for d in self.dataset_ids)

    # -------------------------------------------------------------- verification
    def _record(self, dataset_id: str, part: int) -> tuple[PartRecord | None, DamagedPart | None]:
        """The part's record checked against the manifest, or why it is unusable."""
        path = part_record_path(self.root, dataset_id, part)

        def damaged(reason: str) -> tuple[None, DamagedPart]:
            return None, DamagedPart(dataset_id=dataset_id, part=part, path=str(path), reason=reason)

        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return damaged(f"part record unreadable ({type(exc).__name__}: {exc})")
        version = raw.get("part_record_version") if isinstance(raw, dict) else None
        if isinstance(version, int) and version > PART_RECORD_VERSION:
            raise ResultsError(
                f"{path} has part_record_version {version}, newer than this code reads ({PART_RECORD_VERSION}); "
                f"update the causal package to read {self.root}"
            )
        try:
            record = PartRecord.model_validate(raw)
        except ValidationError as exc:
            return damaged(f"part record malformed ({exc.error_count()} errors: {exc.errors()[0]['msg']})")
        dataset = self.manifest.dataset(dataset_id)
        cell_ids = [c.cell_id for c in self.manifest.cells]
        if record.dataset_id != dataset_id or record.dataset_fingerprint != dataset.fingerprint:
            return damaged(f"record belongs to dataset {record.dataset_id!r} (fingerprint "
                           f"{record.dataset_fingerprint[:12]}), not to {dataset_id!r} ({dataset.fingerprint[:12]})")
        if record.part != part:
            return damaged(f"record belongs to part {record.part}, not to part {part}")
        if record.producer_sha256 != self.manifest.producer_sha256():
            return damaged("record was written by a different experiment (model or settings differ from the manifest)")
        if record.cell_ids != cell_ids:
            return damaged(f"record lists {len(record.cell_ids)} cells that differ from the manifest's {len(cell_ids)}")
        expected = self.manifest.part_indices(dataset_id, part)
        if record.example_indices != expected:
            return damaged(f"record lists examples {describe_indices(record.example_indices)}, the part holds {describe_indices(expected)}")
        for kind in PART_KINDS:
            if kind not in record.files:
                return damaged(f"record has no entry for the {kind} file")
            want = relative_path(self.root, part_path(self.root, kind, dataset_id, part))
            if record.files[kind].path != want:
                return damaged(f"record describes {record.files[kind].path}, not {want}")
        return record, None

    def _load_part(self, kind: str, dataset_id: str, part: int) -> tuple[pd.DataFrame | None, DamagedPart | None]:
        """One part's table after every check (record, bytes, sha256, rows), or why it fails them."""
        path = part_path(self.root, kind, dataset_id, part)

        def damaged(reason: str) -> tuple[None, DamagedPart]:
            return None, DamagedPart(dataset_id=dataset_id, part=part, path=str(path), reason=reason)

        record = None
        if self.has_part_records:
            record, problem = self._record(dataset_id, part)
            if problem is not None:
                return None, problem
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return damaged("file is missing although the part is recorded as finished")
        if record is not None:
            entry = record.files[kind]  # type: ignore[index]
            if len(data) < entry.n_bytes:
                return damaged(f"file has {len(data)} bytes, its record says {entry.n_bytes}: "
                               f"truncated or replaced (sha256 mismatch)")
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                size = f", {len(data)} bytes vs {entry.n_bytes} recorded" if len(data) != entry.n_bytes else ""
                return damaged(f"file content differs from its record (sha256 mismatch{size}): replaced or modified")
        try:
            frame = parse_parquet(data)
        except Exception as exc:  # pyarrow raises several types for damaged files
            return damaged(f"not a readable parquet file ({type(exc).__name__}: {exc})")
        if record is not None and len(frame) != record.files[kind].n_rows:  # type: ignore[index]
            return damaged(f"file has {len(frame)} rows, its record says {record.files[kind].n_rows}")  # type: ignore[index]
        problem = content_problem(kind, frame, self.manifest.part_indices(dataset_id, part),
                                   [c.cell_id for c in self.manifest.cells])
        if problem is not None:
            return damaged(problem)
        return frame, None

    def load_block(self, dataset_id: str, part: int, block: tuple[int, int], cell_ids: list[str] | None = None
                   ) -> tuple[dict[str, pd.DataFrame] | None, BlockRecord | None, str | None]:
        """A cell block's tables {"base", "cells"} and record after every check (record against the manifest,
        bytes, sha256, rows, content; its cells equal ``cell_ids`` when given), or (None, None, why not).
        "not written" when it has no record."""
        return shards.load_block(self, dataset_id, part, block, cell_ids)

    def _orphans(self, dataset_id: str, part: int) -> DamagedPart | None:
        """Parquet files of an unfinished part (their record never got written, or was deleted)."""
        if not self.has_part_records or self.is_finished(dataset_id, part):
            return None
        present = [p for p in (part_path(self.root, k, dataset_id, part) for k in PART_KINDS) if p.exists()]
        if not present:
            return None
        return DamagedPart(
            dataset_id=dataset_id, part=part, path=str(present[0]),
            reason=f"no part record ({relative_path(self.root, part_record_path(self.root, dataset_id, part))}) for "
                   f"{', '.join(relative_path(self.root, p) for p in present)}: the write was interrupted or the record deleted",
        )

    def verify(self, dataset_id: str | None = None) -> list[DamagedPart]:
        """Every damaged part (reading all bytes): finished parts failing a check, and part files without a record.

        Parts not written yet are not damage (see ``missing_parts``); an empty list means every
        finished part is intact.
        """
        self._warn_legacy()
        ids = [dataset_id] if dataset_id is not None else self.dataset_ids
        found = []
        for did in ids:
            self._check_dataset(did)
            for part in range(self.manifest.n_parts(did)):
                orphan = self._orphans(did, part)
                if orphan is not None:
                    found.append(orphan)
                    continue
                if not self.is_finished(did, part):
                    continue
                for kind in PART_KINDS:
                    _, problem = self._load_part(kind, did, part)
                    if problem is not None:
                        found.append(problem)
                        break
        return found

    def is_intact(self, dataset_id: str, part: int) -> bool:
        """The part is finished and passes every check (both files read and hashed)."""
        if not self.is_finished(dataset_id, part):
            return False
        return all(self._load_part(kind, dataset_id, part)[1] is None for kind in PART_KINDS)

    @staticmethod
    def _damage_error(problem: DamagedPart) -> ResultsError:
        return ResultsError(
            f"damaged results file {problem.path}: {problem.reason} (part {problem.part} of dataset "
            f"{problem.dataset_id!r}). Delete it and rerun step 2 (the same command) to recompute that part."
        )

    def _read_parts(self, kind: str, dataset_id: str) -> pd.DataFrame:
        self._check_dataset(dataset_id)
        self._warn_legacy()
        n_parts = self.manifest.n_parts(dataset_id)
        for part in range(n_parts):
            orphan = self._orphans(dataset_id, part)
            if orphan is not None:
                raise self._damage_error(orphan)
        missing = self.missing_parts(dataset_id)
        if missing:
            raise ResultsError(
                f"results for dataset {dataset_id!r} in {self.root} are incomplete ({len(missing)} of "
                f"{n_parts} parts missing); rerun the same command to resume"
            )
        frames = []
        for part in range(n_parts):
            frame, problem = self._load_part(kind, dataset_id, part)
            if problem is not None:
                raise self._damage_error(problem)
            frames.append(frame)
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
