"""Writing a results folder: ``RawResultsWriter`` creates or resumes one under its lock, a part at a time. Torch-free.

A part is written as: base parquet, cells parquet, then its record (each file atomically), so it counts as
finished only once its record exists. The writer refuses a folder of another experiment or one held by another
writer, removes temp files left by a killed write (``remove_leftover_temp_files``), upgrades a folder written
before part records existed, and ``discard_damaged_parts()`` deletes damaged parts so they are recomputed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from causal.results.atomic import (
    TEMP_FILE_PATTERN,
    atomic_write_bytes,
    atomic_write_json,
    parquet_bytes,
    parse_parquet,
)
from causal.results.layout import (
    BLOCKS_DIR,
    LOCK_NAME,
    MANIFEST_NAME,
    PART_KINDS,
    PARTS_DIR,
    PARTS_FORMAT_NAME,
    block_path,
    block_record_path,
    part_path,
    part_record_path,
    relative_path,
)
from causal.results.lock import FolderLock
from causal.results.reader import RawResults
from causal.results.schema import (
    PART_RECORD_VERSION,
    BlockRecord,
    DamagedPart,
    FileRecord,
    PartRecord,
    ResultsError,
    ResultsManifest,
)
from causal.results.tables import content_problem, rows_to_frames


_RESTART_HINT = ("; if it holds this experiment's results with a lost or damaged manifest, rerun the step with "
                 "--restart (restart=True) to discard them and start over")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RawResultsWriter:
    """Creates or resumes a results folder, holding its lock until ``close()`` (or the end of a ``with``).

    Refuses a folder that holds a different experiment, and one that another writer holds
    (``ResultsLockedError``; ``wait=True`` waits for it, up to ``timeout`` seconds if given).
    Under the lock it removes temp files left by a killed write, replaces a manifest that a
    killed first write left unreadable when no results exist yet, and upgrades a folder written
    before part records existed. ``log`` receives one line per such repair (default: stderr).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        manifest: ResultsManifest,
        wait: bool = False,
        timeout: float | None = None,
        log: Callable[[str], None] | None = _stderr,
        restart: bool = False,
    ):
        self.root = Path(root)
        self.manifest = manifest
        self.log = log or (lambda message: None)
        self.lock = FolderLock(self.root, wait=wait, timeout=timeout).acquire()
        try:
            if restart:
                self._discard()
            self._open()
        except BaseException:
            self.lock.release()
            raise

    def _discard(self) -> None:
        """``restart``: delete this folder's results (manifest, base, cells, parts, blocks) under the lock; files
        of any other name are left alone (and make the folder refused as of unknown origin)."""
        gone = []
        for name in (MANIFEST_NAME, "base", "cells", PARTS_DIR, BLOCKS_DIR):
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
                gone.append(name)
            elif path.exists():
                path.unlink()
                gone.append(name)
        if gone:
            self.log(f"{self.root}: restart: discarded {', '.join(gone)}")

    def _open(self) -> None:
        removed = remove_leftover_temp_files(self.root)
        if removed:
            self.log(f"{self.root}: removed {len(removed)} temp file(s) left by an interrupted write: "
                     f"{', '.join(relative_path(self.root, p) for p in removed[:5])}{' ...' if len(removed) > 5 else ''}")
        manifest_path = self.root / MANIFEST_NAME
        data_present = any((self.root / d).exists() and any((self.root / d).iterdir())
                           for d in ("base", "cells", BLOCKS_DIR))
        existing: ResultsManifest | None = None
        if manifest_path.exists():
            try:
                existing = RawResults.read_manifest(self.root)
            except ResultsError as exc:
                if data_present:
                    raise ResultsError(f"{exc}{_RESTART_HINT}") from exc
                self.log(f"{manifest_path} was unreadable and no results exist yet: writing it anew")
        if existing is not None:
            if existing.identity() != self.manifest.identity():
                old, new = existing.model_dump(mode="json"), self.manifest.model_dump(mode="json")
                differ = sorted(k for k in new if old.get(k) != new[k])
                details = [f"{k}.{kk}" for k in ("model", "settings") if k in differ
                           for kk in sorted(set(old[k]) | set(new[k])) if old[k].get(kk) != new[k].get(kk)]
                raise ResultsError(
                    f"{self.root} already holds results of a different experiment "
                    f"(experiment_id={existing.experiment_id!r}; differing: {', '.join(details + differ)}); "
                    f"use another results folder, or rerun with --restart (restart=True) to discard its results"
                )
            if not (self.root / PARTS_DIR).is_dir():
                self._upgrade_legacy()
            return
        expected = {LOCK_NAME, MANIFEST_NAME} | ({"base", "cells", PARTS_DIR, BLOCKS_DIR} if manifest_path.exists() else set())
        unknown = sorted(p.name for p in self.root.iterdir() if p.name not in expected)
        if unknown:
            raise ResultsError(
                f"{self.root} is not empty but holds no {MANIFEST_NAME} (it holds {', '.join(unknown[:5])}): "
                f"refusing to mix new results with files of unknown origin; use an empty or new folder"
                f"{_RESTART_HINT if {'base', 'cells', PARTS_DIR} & set(unknown) else ''}"
            )
        atomic_write_json(manifest_path, self.manifest.model_dump(mode="json"))
        self._write_parts_format()

    def _write_parts_format(self) -> None:
        atomic_write_json(self.root / PARTS_DIR / PARTS_FORMAT_NAME, {"part_record_version": PART_RECORD_VERSION})

    def _upgrade_legacy(self) -> None:
        """Record the parts of a folder written before part records existed that pass the content checks."""
        legacy = RawResults(self.root)
        intact = [
            (did, part) for did in legacy.dataset_ids for part in range(self.manifest.n_parts(did))
            if legacy.is_intact(did, part)
        ]
        for did, part in intact:  # (the first record makes the folder one with part records)
            self._write_record(did, part, {kind: part_path(self.root, kind, did, part).read_bytes() for kind in PART_KINDS})
        self._write_parts_format()
        recorded = len(intact)
        self.log(f"{self.root}: written before part records existed; recorded {recorded} part(s) that pass the "
                 f"content checks (their bytes are trusted as found); any others are recomputed")

    def results(self) -> RawResults:
        return RawResults(self.root)

    def missing_parts(self, dataset_id: str) -> list[int]:
        return self.results().missing_parts(dataset_id)

    def has_part(self, dataset_id: str, part: int) -> bool:
        """The part is on disk and intact (reads and hashes both files)."""
        return self.results().is_intact(dataset_id, part)

    def discard_damaged_parts(self) -> list[DamagedPart]:
        """Verify every part; delete the record and files of each damaged one (so it is recomputed). Returns them."""
        damaged = self.results().verify()
        for problem in damaged:
            self.discard_part(problem.dataset_id, problem.part)
        return damaged

    def discard_part(self, dataset_id: str, part: int) -> None:
        """Delete one part (record first, so that it never looks finished while half deleted)."""
        part_record_path(self.root, dataset_id, part).unlink(missing_ok=True)
        for kind in PART_KINDS:
            part_path(self.root, kind, dataset_id, part).unlink(missing_ok=True)

    def _new_record(self, cls: type[PartRecord], dataset_id: str, part: int, cell_ids: list[str],
                paths: dict[str, Path], files: dict[str, bytes], n_rows: dict[str, int], **extra: Any) -> PartRecord:
        """The record (``cls``: part or block) describing ``files`` written at ``paths``."""
        return cls(
            dataset_id=dataset_id,
            dataset_fingerprint=self.manifest.dataset(dataset_id).fingerprint,
            part=part,
            example_indices=self.manifest.part_indices(dataset_id, part),
            cell_ids=list(cell_ids),
            producer_sha256=self.manifest.producer_sha256(),
            files={kind: FileRecord(path=relative_path(self.root, paths[kind]), n_bytes=len(data),
                                    sha256=hashlib.sha256(data).hexdigest(), n_rows=n_rows[kind])
                   for kind, data in files.items()},
            **extra,
        )

    def _write_record(self, dataset_id: str, part: int, files: dict[str, bytes]) -> None:
        """Record of a part whose files are already on disk (rows counted by reading the bytes)."""
        n_rows = {kind: len(parse_parquet(data)) for kind, data in files.items()}
        paths = {kind: part_path(self.root, kind, dataset_id, part) for kind in files}
        record = self._new_record(PartRecord, dataset_id, part, [c.cell_id for c in self.manifest.cells], paths, files,
                              n_rows)
        atomic_write_json(part_record_path(self.root, dataset_id, part), record.model_dump(mode="json"))

    def _write_pair(self, what: str, dataset_id: str, part: int, frames: dict[str, pd.DataFrame], cell_ids: list[str],
                    paths: dict[str, Path], record_path: Path, cls: type[PartRecord], **extra: Any) -> None:
        """Check ``frames`` hold exactly the part's examples × ``cell_ids`` (``ValueError`` naming ``what``,
        writing nothing), then write both files and, last, their record (which marks them finished)."""
        if not self.lock.held:
            raise ResultsError(f"this writer of {self.root} was closed; open a new RawResultsWriter to write")
        indices = self.manifest.part_indices(dataset_id, part)
        for kind, frame in frames.items():
            problem = content_problem(kind, frame, indices, cell_ids)
            if problem is not None:
                raise ValueError(f"refusing to write {what}: its {kind} rows: {problem}")
        files = {kind: parquet_bytes(frames[kind]) for kind in PART_KINDS}
        record_path.unlink(missing_ok=True)
        for kind in PART_KINDS:
            atomic_write_bytes(paths[kind], files[kind])
        record = self._new_record(cls, dataset_id, part, cell_ids, paths, files,
                              {kind: len(frame) for kind, frame in frames.items()}, **extra)
        atomic_write_json(record_path, record.model_dump(mode="json"))

    def write_part(
        self, dataset_id: str, part: int, base_rows: Iterable[dict[str, Any]], cell_rows: Iterable[dict[str, Any]]
    ) -> None:
        """Write one part: base parquet, cells parquet, then its record (which marks the part finished).

        Raises ``ValueError`` (writing nothing) when the rows are not exactly the part's examples
        (base) and every cell × example (cells).
        """
        self.write_part_frames(dataset_id, part, rows_to_frames(base_rows, cell_rows))

    def write_part_frames(self, dataset_id: str, part: int, frames: dict[str, pd.DataFrame]) -> None:
        """``write_part`` from tables {"base", "cells"} in the output schema."""
        self._write_pair(f"part {part} of dataset {dataset_id!r}", dataset_id, part, frames,
                         [c.cell_id for c in self.manifest.cells],
                         {kind: part_path(self.root, kind, dataset_id, part) for kind in PART_KINDS},
                         part_record_path(self.root, dataset_id, part), PartRecord)

    def write_block(self, dataset_id: str, part: int, block: tuple[int, int], cell_ids: list[str],
                    base_rows: Iterable[dict[str, Any]], cell_rows: Iterable[dict[str, Any]]) -> None:
        """Write block ``block`` = (B, M) of a part, holding the cells ``cell_ids`` (a cell-range shard's unit):
        its two files under ``blocks/``, then its record. Raises ``ValueError`` (writing nothing) on rows
        that are not exactly the part's examples × those cells."""
        self._write_pair(f"block {block[0]}/{block[1]} of part {part} of dataset {dataset_id!r}", dataset_id, part,
                         rows_to_frames(base_rows, cell_rows), cell_ids,
                         {kind: block_path(self.root, kind, dataset_id, part, block) for kind in PART_KINDS},
                         block_record_path(self.root, dataset_id, part, block), BlockRecord,
                         block=block[0], n_blocks=block[1])

    def close(self) -> None:
        """Release the folder lock."""
        self.lock.release()

    def __enter__(self) -> "RawResultsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def remove_leftover_temp_files(root: str | os.PathLike[str]) -> list[Path]:
    """Delete ``.<name>.<random>.tmp`` files (from killed atomic writes) in a results folder; call under its lock.

    Looks only at the folder itself and its ``base/``, ``cells/``, ``parts/`` and ``blocks/`` trees. Returns
    what it removed.
    """
    root = Path(root)
    candidates: list[Path] = [p for p in root.glob(".*.tmp")] if root.is_dir() else []
    for sub in ("base", "cells", PARTS_DIR, BLOCKS_DIR):
        if (root / sub).is_dir():
            candidates += [p for p in (root / sub).rglob(".*.tmp")]
    removed = []
    for path in sorted(candidates):
        if path.is_file() and not path.is_symlink() and TEMP_FILE_PATTERN.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
