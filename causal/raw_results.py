"""Raw intervention results on disk: a JSON manifest plus parquet tables, each part with a record. Torch-free.

Layout of a results folder::

    manifest.json                          # ResultsManifest: what produced the results
    base/<dataset_id>/part_00000.parquet   # one row per example: the unintervened output
    cells/<dataset_id>/part_00000.parquet  # one row per (cell, example): the intervened output
    parts/format.json                      # {"part_record_version": 1}: this folder keeps part records
    parts/<dataset_id>/part_00000.json     # PartRecord: what part 0 holds, with sha256 of both files
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
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import re
import socket
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

try:  # POSIX; elsewhere the lock falls back to an exclusively created file
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 2
"""2: cells record their intervention kind and parameters, units their featurizer (id, weights hash,
feature indices). Version-1 folders are read (their cells are interchanges through the identity)."""
MANIFEST_NAME = "manifest.json"
PART_RECORD_VERSION = 1
PARTS_DIR = "parts"
#: Cell-range shards write a part's cell blocks here (``blocks/<dataset_id>/part_NNNNN.block_B-of-M.*``);
#: ``experiments.fleet.merge_shards`` assembles them into ordinary parts.
BLOCKS_DIR = "blocks"
PARTS_FORMAT_NAME = "format.json"
LOCK_NAME = ".lock"
PART_KINDS = ("base", "cells")

OUTPUT_COLUMNS = ["example_index", "output_text", "output_token_ids", "topk_token_ids", "topk_logits"]

# temp files of atomic_write_bytes: ".<target name>.<random>.tmp"
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


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


# ------------------------------------------------------------------------------------------ atomic writes


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The file gets the mode an ordinary ``open(path, "wb")`` would give (0o666 minus the umask).
    A kill mid-write leaves ``.<name>.<random>.tmp`` next to ``path``; writers remove those under the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        if not hasattr(os, "fchmod"):  # pragma: no cover - not POSIX
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """The parquet serialisation of ``frame`` (no index), as written to disk."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_bytes(path, parquet_bytes(frame))


def _parse_parquet(data: bytes) -> pd.DataFrame:
    return pq.read_table(pa.BufferReader(data)).to_pandas()


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


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


# ------------------------------------------------------------------------------------------ folder lock


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (unknown counts as alive)."""
    if os.name != "posix":  # pragma: no cover - no safe probe without extra dependencies
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


class FolderLock:
    """Exclusive lock on a results folder: ``<root>/.lock`` holds the holder's pid and host.

    On POSIX the lock is ``fcntl.flock`` on that file, so the kernel drops it when the holder dies
    and a lock left by a dead process is simply taken over. Elsewhere the file is created
    exclusively, and one naming a dead pid on this host is taken over. ``wait=False`` raises
    ``ResultsLockedError`` at once when the folder is held; ``wait=True`` waits (up to ``timeout``
    seconds if given).
    """

    def __init__(self, root: str | os.PathLike[str], wait: bool = False, timeout: float | None = None,
                 poll_seconds: float = 0.2):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.wait = wait or timeout is not None
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self._fd: int | None = None
        self._owner_pid: int | None = None  # a forked child inherits the object but must not release the lock
        self.taken_over: dict[str, Any] | None = None  # holder info left in the file by a dead process

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder_info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def read_holder(self) -> dict[str, Any] | None:
        """The pid/host/since written by the current (or last) holder; None if unreadable."""
        try:
            info = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _describe(self, holder: dict[str, Any] | None) -> str:
        if not holder:
            return "another process (holder unknown)"
        return f"pid {holder.get('pid')} on host {holder.get('host')!r} (since {holder.get('since')})"

    def _refuse(self, holder: dict[str, Any] | None) -> ResultsLockedError:
        waited = f" after waiting {self.timeout:g} s" if self.wait and self.timeout is not None else ""
        hint = "" if fcntl is not None else f"; if that process is gone, delete {self.path}"
        return ResultsLockedError(
            f"results folder {self.root} is being written by {self._describe(holder)}{waited}; "
            f"two writers on one folder would compute the same parts twice. Wait for it to finish, "
            f"pass wait=True to wait for the lock, or use another results folder{hint}"
        )

    def acquire(self) -> "FolderLock":
        if self.held:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            holder = self._try_flock() if fcntl is not None else self._try_exclusive()
            if self.held:
                return self
            if not self.wait or (deadline is not None and time.monotonic() >= deadline):
                raise self._refuse(holder)
            time.sleep(self.poll_seconds if deadline is None else max(0.0, min(self.poll_seconds, deadline - time.monotonic())))

    def _write_holder(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(self._holder_info()).encode())
        os.fsync(fd)

    def _try_flock(self) -> dict[str, Any] | None:
        """One attempt; on success sets ``_fd``, else returns the holder's info."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return self.read_holder()
        try:  # the holder we waited for may have removed the file: then our lock is on a stale inode
            current = os.stat(self.path)
            mine = os.fstat(fd)
            same = (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev)
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return self._try_flock()
        previous = self.read_holder()
        if previous and previous.get("pid") != os.getpid():
            self.taken_over = previous
        self._write_holder(fd)
        self._fd, self._owner_pid = fd, os.getpid()
        return None

    def _try_exclusive(self) -> dict[str, Any] | None:
        """Fallback without flock: create the file exclusively; take over one left by a dead pid on this host."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = self.read_holder()
            if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                # best effort without flock: remove the file only while it still names the dead process
                if self.read_holder() == holder:
                    self.path.unlink(missing_ok=True)
                    self.taken_over = holder
                return self._try_exclusive()
            return holder
        self._write_holder(fd)
        self._fd, self._owner_pid = fd, os.getpid()
        return None

    def release(self) -> None:
        """Remove the lock file and drop the lock (removing first: a waiter then finds a new file)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._owner_pid == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------ reading


def _frames(base_rows: Iterable[dict[str, Any]], cell_rows: Iterable[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """Output rows as the two tables of a part file pair."""
    return {"base": pd.DataFrame(list(base_rows), columns=OUTPUT_COLUMNS),
            "cells": pd.DataFrame(list(cell_rows), columns=["cell_id", *OUTPUT_COLUMNS])}


def _content_problem(kind: str, frame: pd.DataFrame, indices: list[int], cell_ids: list[str]) -> str | None:
    """Why a part's table does not hold exactly the expected rows (None when it does)."""
    columns = OUTPUT_COLUMNS if kind == "base" else ["cell_id", *OUTPUT_COLUMNS]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        return f"columns {missing} are missing"
    got = [int(i) for i in frame["example_index"]]
    if kind == "base":
        if sorted(got) != indices:
            return f"holds examples {_span(got)} instead of {_span(indices)}"
        return None
    expected = len(cell_ids) * len(indices)
    pairs = set(zip(frame["cell_id"].astype(str), got))
    wanted = {(c, i) for c in cell_ids for i in indices}
    if len(frame) != expected or pairs != wanted:
        stray = sorted(pairs - wanted)[:3]
        absent = sorted(wanted - pairs)[:3]
        detail = "; ".join(x for x in (f"unexpected (cell, example) e.g. {stray}" if stray else "",
                                       f"missing e.g. {absent}" if absent else "") if x)
        return (f"holds {len(frame)} rows, expected {expected} (cells x examples {_span(indices)})"
                + (f": {detail}" if detail else ": duplicated rows"))
    return None


def _span(indices: list[int]) -> str:
    if not indices:
        return "[]"
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return f"[{indices[0]}..{indices[-1]}]"
    return str(indices[:8])[:-1] + (", ...]" if len(indices) > 8 else "]")


class RawResults:
    """Read access to a results folder (see module docstring for the layout); every part read is verified."""

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
        return (self.root / PARTS_DIR).is_dir()

    def _check_dataset(self, dataset_id: str) -> None:
        if dataset_id not in self.dataset_ids:
            raise KeyError(f"dataset {dataset_id!r} is not in these results (have {self.dataset_ids})")

    def _warn_legacy(self) -> None:
        if not self.has_part_records and not self._warned_legacy:
            self._warned_legacy = True
            warnings.warn(
                f"{self.root} was written before part records existed: its parts get content checks (example "
                f"indices, cell ids, row counts) but cannot be verified by hash. Rerun step 2 on it (the same "
                f"command) to record its intact parts and recompute the others.",
                ResultsWarning, stacklevel=3,
            )

    def is_finished(self, dataset_id: str, part: int) -> bool:
        """The part's writer got to its end: its record exists (before part records: both parquet files do)."""
        if self.has_part_records:
            return part_record_path(self.root, dataset_id, part).exists()
        return all(part_path(self.root, kind, dataset_id, part).exists() for kind in PART_KINDS)

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
            return damaged(f"record lists examples {_span(record.example_indices)}, the part holds {_span(expected)}")
        for kind in PART_KINDS:
            if kind not in record.files:
                return damaged(f"record has no entry for the {kind} file")
            want = _rel(self.root, part_path(self.root, kind, dataset_id, part))
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
            frame = _parse_parquet(data)
        except Exception as exc:  # pyarrow raises several types for damaged files
            return damaged(f"not a readable parquet file ({type(exc).__name__}: {exc})")
        if record is not None and len(frame) != record.files[kind].n_rows:  # type: ignore[index]
            return damaged(f"file has {len(frame)} rows, its record says {record.files[kind].n_rows}")  # type: ignore[index]
        problem = _content_problem(kind, frame, self.manifest.part_indices(dataset_id, part),
                                   [c.cell_id for c in self.manifest.cells])
        if problem is not None:
            return damaged(problem)
        return frame, None

    def load_block(self, dataset_id: str, part: int, block: tuple[int, int], cell_ids: list[str] | None = None
                   ) -> tuple[dict[str, pd.DataFrame] | None, BlockRecord | None, str | None]:
        """A cell block's tables {"base", "cells"} and record after every check (record against the manifest,
        bytes, sha256, rows, content; its cells equal ``cell_ids`` when given), or (None, None, why not).
        "not written" when it has no record."""
        path = block_record_path(self.root, dataset_id, part, block)
        if not path.exists():
            return None, None, "not written"
        try:
            record = BlockRecord.model_validate_json(path.read_text())
        except (OSError, ValidationError, ValueError) as exc:
            return None, None, f"{path}: block record unreadable or malformed ({type(exc).__name__})"
        dataset = self.manifest.dataset(dataset_id)
        expected = self.manifest.part_indices(dataset_id, part)
        known = {c.cell_id for c in self.manifest.cells}
        if (record.dataset_id, record.dataset_fingerprint, record.part, (record.block, record.n_blocks)) != (
                dataset_id, dataset.fingerprint, part, tuple(block)):
            return None, None, f"{path}: record belongs to another dataset, part or block"
        if record.producer_sha256 != self.manifest.producer_sha256():
            return None, None, f"{path}: written by a different experiment (model or settings differ)"
        if record.example_indices != expected or not set(record.cell_ids) <= known:
            return None, None, f"{path}: record lists other examples or unknown cells"
        if cell_ids is not None and record.cell_ids != list(cell_ids):
            return None, None, f"{path}: holds other cells than block {block[0]} of {block[1]} is planned to hold"
        frames = {}
        for kind in PART_KINDS:
            file = block_path(self.root, kind, dataset_id, part, block)
            entry = record.files.get(kind)  # type: ignore[call-overload]
            if entry is None or entry.path != _rel(self.root, file):
                return None, None, f"{path}: record does not describe {_rel(self.root, file)}"
            try:
                data = file.read_bytes()
            except OSError:
                return None, None, f"{file}: missing although the block is recorded as finished"
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                return None, None, f"{file}: content differs from its record (sha256 mismatch)"
            frame = _parse_parquet(data)
            problem = _content_problem(kind, frame, expected, record.cell_ids)
            if len(frame) != entry.n_rows or problem is not None:
                return None, None, f"{file}: {problem or 'row count differs from its record'}"
            frames[kind] = frame
        return frames, record, None

    def _orphans(self, dataset_id: str, part: int) -> DamagedPart | None:
        """Parquet files of an unfinished part (their record never got written, or was deleted)."""
        if not self.has_part_records or self.is_finished(dataset_id, part):
            return None
        present = [p for p in (part_path(self.root, k, dataset_id, part) for k in PART_KINDS) if p.exists()]
        if not present:
            return None
        return DamagedPart(
            dataset_id=dataset_id, part=part, path=str(present[0]),
            reason=f"no part record ({_rel(self.root, part_record_path(self.root, dataset_id, part))}) for "
                   f"{', '.join(_rel(self.root, p) for p in present)}: the write was interrupted or the record deleted",
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


# ------------------------------------------------------------------------------------------ writing


_RESTART_HINT = ("; if it holds this experiment's results with a lost or damaged manifest, rerun step 2 with "
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
                     f"{', '.join(_rel(self.root, p) for p in removed[:5])}{' ...' if len(removed) > 5 else ''}")
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
        legacy._warned_legacy = True
        intact = [
            (did, part) for did in legacy.dataset_ids for part in range(self.manifest.n_parts(did))
            if legacy.is_finished(did, part)
            and all(legacy._load_part(kind, did, part)[1] is None for kind in PART_KINDS)
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
            files={kind: FileRecord(path=_rel(self.root, paths[kind]), n_bytes=len(data),
                                    sha256=hashlib.sha256(data).hexdigest(), n_rows=n_rows[kind])
                   for kind, data in files.items()},
            **extra,
        )

    def _write_record(self, dataset_id: str, part: int, files: dict[str, bytes]) -> None:
        """Record of a part whose files are already on disk (rows counted by reading the bytes)."""
        n_rows = {kind: len(_parse_parquet(data)) for kind, data in files.items()}
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
            problem = _content_problem(kind, frame, indices, cell_ids)
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
        self.write_part_frames(dataset_id, part, _frames(base_rows, cell_rows))

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
                         _frames(base_rows, cell_rows), cell_ids,
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
        if path.is_file() and not path.is_symlink() and _TMP_NAME.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
