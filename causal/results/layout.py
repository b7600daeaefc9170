"""Where things live in a results folder: the names of its files and folders and the path of every part. Torch-free.

``part_path`` / ``part_record_path`` give a part's parquet files (``base/``, ``cells/``) and its record
(``parts/``); ``block_path`` / ``block_record_path`` the same for the cell blocks of cell-range shards
(``blocks/``). ``relative_path`` is how records name a file (relative to the folder, POSIX separators).
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_NAME = "manifest.json"
PARTS_DIR = "parts"
#: Cell-range shards write a part's cell blocks here (``blocks/<dataset_id>/part_NNNNN.block_B-of-M.*``);
#: ``experiments.engine.fleet.merge_shards`` assembles them into ordinary parts.
BLOCKS_DIR = "blocks"
PARTS_FORMAT_NAME = "format.json"
LOCK_NAME = ".lock"
PART_KINDS = ("base", "cells")


def part_file_name(index: int) -> str:
    return f"part_{index:05d}.parquet"


def part_path(root: Path, kind: str, dataset_id: str, part: int) -> Path:
    """``root/<kind>/<dataset_id>/part_NNNNN.parquet``; kind is "base" or "cells"."""
    return root / kind / dataset_id / part_file_name(part)


def block_path(root: Path, kind: str, dataset_id: str, part: int, block: tuple[int, int]) -> Path:
    """``root/blocks/<dataset_id>/part_NNNNN.block_B-of-M.<kind>.parquet`` (block B of M of a part)."""
    return root / BLOCKS_DIR / dataset_id / f"part_{part:05d}.block_{block[0]}-of-{block[1]}.{kind}.parquet"


def block_record_path(root: Path, dataset_id: str, part: int, block: tuple[int, int]) -> Path:
    """The record that marks block B of M of a part finished (written after its two files)."""
    return root / BLOCKS_DIR / dataset_id / f"part_{part:05d}.block_{block[0]}-of-{block[1]}.json"


def part_record_path(root: Path, dataset_id: str, part: int) -> Path:
    """``root/parts/<dataset_id>/part_NNNNN.json``: the record that marks a part finished."""
    return root / PARTS_DIR / dataset_id / f"part_{part:05d}.json"


def relative_path(root: Path, path: Path) -> str:
    """``path`` relative to the folder ``root``, with ``/`` separators (as part records name files)."""
    return path.relative_to(root).as_posix()
