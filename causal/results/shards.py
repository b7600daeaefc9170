"""Reading back the cell blocks of cell-range shards (``blocks/``), each verified against its record. Torch-free.

A shard of a sweep with M cell blocks per part writes block B of M of a part as its own base and cells files
under ``blocks/<dataset_id>/`` and, last, a ``BlockRecord`` (``RawResultsWriter.write_block``).
``load_block`` (also ``RawResults.load_block``) reads one back after every check;
``experiments.engine.fleet.merge_shards`` assembles verified blocks into ordinary parts.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pandas as pd
from pydantic import ValidationError

from causal.results.atomic import parse_parquet
from causal.results.layout import PART_KINDS, block_path, block_record_path, relative_path
from causal.results.schema import BlockRecord
from causal.results.tables import content_problem

if TYPE_CHECKING:
    from causal.results.reader import RawResults


def load_block(results: "RawResults", dataset_id: str, part: int, block: tuple[int, int],
               cell_ids: list[str] | None = None
               ) -> tuple[dict[str, pd.DataFrame] | None, BlockRecord | None, str | None]:
    """A cell block's tables {"base", "cells"} and record from ``results`` after every check (record against the
    manifest, bytes, sha256, rows, content; its cells equal ``cell_ids`` when given), or (None, None, why not).
    "not written" when it has no record."""
    path = block_record_path(results.root, dataset_id, part, block)
    if not path.exists():
        return None, None, "not written"
    try:
        record = BlockRecord.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError) as exc:
        return None, None, f"{path}: block record unreadable or malformed ({type(exc).__name__})"
    dataset = results.manifest.dataset(dataset_id)
    expected = results.manifest.part_indices(dataset_id, part)
    known = {c.cell_id for c in results.manifest.cells}
    if (record.dataset_id, record.dataset_fingerprint, record.part, (record.block, record.n_blocks)) != (
            dataset_id, dataset.fingerprint, part, tuple(block)):
        return None, None, f"{path}: record belongs to another dataset, part or block"
    if record.producer_sha256 != results.manifest.producer_sha256():
        return None, None, f"{path}: written by a different experiment (model or settings differ)"
    if record.example_indices != expected or not set(record.cell_ids) <= known:
        return None, None, f"{path}: record lists other examples or unknown cells"
    if cell_ids is not None and record.cell_ids != list(cell_ids):
        return None, None, f"{path}: holds other cells than block {block[0]} of {block[1]} is planned to hold"
    frames = {}
    for kind in PART_KINDS:
        file = block_path(results.root, kind, dataset_id, part, block)
        entry = record.files.get(kind)  # type: ignore[call-overload]
        if entry is None or entry.path != relative_path(results.root, file):
            return None, None, f"{path}: record does not describe {relative_path(results.root, file)}"
        try:
            data = file.read_bytes()
        except OSError:
            return None, None, f"{file}: missing although the block is recorded as finished"
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            return None, None, f"{file}: content differs from its record (sha256 mismatch)"
        frame = parse_parquet(data)
        problem = content_problem(kind, frame, expected, record.cell_ids)
        if len(frame) != entry.n_rows or problem is not None:
            return None, None, f"{file}: {problem or 'row count differs from its record'}"
        frames[kind] = frame
    return frames, record, None
