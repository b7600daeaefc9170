"""Folders written before part records existed (no ``parts/`` folder): how they are recognised and read. Torch-free.

Their parts cannot be verified by hash: a part counts as finished once both its parquet files exist, and it gets
the content checks only (example indices, cell ids, row counts), with one ``ResultsWarning`` per reader.
Resuming such a folder with a ``RawResultsWriter`` upgrades it: parts that pass the content checks get a record,
the others are recomputed. (Manifests of results format 1 need no code of their own: the schema's defaults
read their cells as interchanges through the identity.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

from causal.results.layout import PART_KINDS, PARTS_DIR, part_path
from causal.results.schema import ResultsWarning


def has_part_records(root: Path) -> bool:
    """False for folders written before part records existed: their parts cannot be verified by hash."""
    return (Path(root) / PARTS_DIR).is_dir()


def finished_without_record(root: Path, dataset_id: str, part: int) -> bool:
    """Whether a part of a folder without part records is finished: both its parquet files exist."""
    return all(part_path(root, kind, dataset_id, part).exists() for kind in PART_KINDS)


def warn_unverifiable(root: Path, stacklevel: int = 1) -> None:
    """The ``ResultsWarning`` that ``root`` cannot be verified by hash (``stacklevel`` as for the caller's warn)."""
    warnings.warn(
        f"{root} was written before part records existed: its parts get content checks (example "
        f"indices, cell ids, row counts) but cannot be verified by hash. Rerun step 2 on it (the same "
        f"command) to record its intact parts and recompute the others.",
        ResultsWarning, stacklevel=stacklevel + 1,
    )
