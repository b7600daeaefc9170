"""Atomic, durable file writes: readers see the old file or the whole new one, never a part. Torch-free.

``atomic_write_bytes`` writes a temp file next to the target (``.<name>.<random>.tmp``, matched by
``TEMP_FILE_PATTERN``), fsyncs it, gives it the mode an ordinary ``open`` would (0o666 minus the umask), renames it
over the target and fsyncs the folder; ``atomic_write_json`` and ``atomic_write_parquet`` build on it.
``parquet_bytes`` / ``parse_parquet`` are the parquet serialisation used for results files.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# temp files of atomic_write_bytes: ".<target name>.<random>.tmp"
TEMP_FILE_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


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


def parse_parquet(data: bytes) -> pd.DataFrame:
    """The table held by parquet ``data`` (bytes as written by ``parquet_bytes``)."""
    return pq.read_table(pa.BufferReader(data)).to_pandas()
