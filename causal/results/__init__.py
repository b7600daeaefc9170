"""Raw intervention results on disk: a JSON manifest plus parquet tables, each part with a record. Torch-free.

Layout of a results folder::

    manifest.json                          # ResultsManifest: what produced the results
    base/<dataset_id>/part_00000.parquet   # one row per example: the unintervened output
    cells/<dataset_id>/part_00000.parquet  # one row per (cell, example): the intervened output
    parts/format.json                      # {"part_record_version": 1}: this folder keeps part records
    parts/<dataset_id>/part_00000.json     # PartRecord: what part 0 holds, with sha256 of both files
    blocks/<dataset_id>/part_00000.block_B-of-M.*  # cell blocks of cell-range shards (see ``shards``)
    .lock                                  # only while a writer holds the folder (pid + host)

A *cell* is one intervention site: one or more model units (layer, component, head,
token position) patched together. Examples are processed in fixed parts of
``example_batch_size`` examples (part i holds examples [i*bs, (i+1)*bs)), each part over
every cell; cells are folded into forwards in the fixed ``cell_groups``.

Integrity. A part is written as: base parquet, cells parquet, then its record (each file
atomically: temp file + rename), so a part counts as finished only once its record exists.
The record (``PartRecord``, versioned on its own by ``PART_RECORD_VERSION``) names the
dataset id and fingerprint, the part index, its example indices, the cell ids, and per file
the byte count, row count and sha256 of the parquet bytes. Reading a part checks all of it
against the manifest and the file, and raises ``ResultsError`` naming the damaged file;
``RawResults.verify()`` lists every damaged part. A writer (``RawResultsWriter``) holds an
exclusive lock on the folder (``.lock``; ``fcntl.flock`` on POSIX), removes temp files left by
a killed write, and ``discard_damaged_parts()`` deletes damaged parts so they are recomputed.

Folders written before part records existed (no ``parts/`` folder) are still read, with a
``ResultsWarning`` that their parts cannot be verified (they get the content checks only:
example indices, cell ids, row counts). Resuming such a folder with a writer upgrades it:
parts that pass the content checks get a record, the others are recomputed.

Output columns (base and intervened tables alike):
``example_index`` (int), ``output_text`` (str, the generated continuation decoded without
special tokens), ``output_token_ids`` (list[int]), ``topk_token_ids`` (list[list[int]],
per generated step), ``topk_logits`` (list[list[float]]). Intervened tables also carry
``cell_id`` (str).

Modules, one job each: ``schema`` (versions, errors, the pydantic records), ``layout`` (file and folder names,
part and block paths), ``atomic`` (atomic writes, parquet bytes), ``tables`` (output columns and the content
check), ``lock`` (``FolderLock``), ``reader`` (``RawResults``), ``legacy`` (folders without part records),
``shards`` (cell blocks of cell-range shards), ``writer`` (``RawResultsWriter``). The names below are the
public API; import them from here.
"""

from causal.results.atomic import (
    TEMP_FILE_PATTERN,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
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
    part_file_name,
    part_path,
    part_record_path,
    relative_path,
)
from causal.results.lock import FolderLock
from causal.results.reader import RawResults
from causal.results.schema import (
    FORMAT_VERSION,
    PART_RECORD_VERSION,
    BlockRecord,
    CellSpec,
    DamagedPart,
    DatasetRecord,
    FileRecord,
    PartRecord,
    ResultsError,
    ResultsLockedError,
    ResultsManifest,
    ResultsWarning,
    UnitAddress,
)
from causal.results.tables import OUTPUT_COLUMNS, content_problem, rows_to_frames
from causal.results.writer import RawResultsWriter, remove_leftover_temp_files

__all__ = [
    # schema
    "FORMAT_VERSION",
    "PART_RECORD_VERSION",
    "ResultsError",
    "ResultsLockedError",
    "ResultsWarning",
    "UnitAddress",
    "CellSpec",
    "DatasetRecord",
    "ResultsManifest",
    "FileRecord",
    "PartRecord",
    "BlockRecord",
    "DamagedPart",
    # layout
    "MANIFEST_NAME",
    "PARTS_DIR",
    "BLOCKS_DIR",
    "PARTS_FORMAT_NAME",
    "LOCK_NAME",
    "PART_KINDS",
    "part_file_name",
    "part_path",
    "part_record_path",
    "block_path",
    "block_record_path",
    "relative_path",
    # atomic writes
    "TEMP_FILE_PATTERN",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_parquet",
    "parquet_bytes",
    "parse_parquet",
    # tables
    "OUTPUT_COLUMNS",
    "content_problem",
    "rows_to_frames",
    # lock, reader, writer
    "FolderLock",
    "RawResults",
    "RawResultsWriter",
    "remove_leftover_temp_files",
]
