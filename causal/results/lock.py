"""The exclusive lock a writer holds on a results folder (``<root>/.lock``, naming the holder's pid and host). Torch-free.

On POSIX it is ``fcntl.flock``, which the kernel drops when the holder dies; elsewhere an exclusively created
file, taken over when it names a dead process on this host. The project keeps its own lock rather than the
``filelock`` package (installed only as a dependency of torch and datasets): the lock file must keep the
holder's identity for the refusal message and ``taken_over``, and a forked child must not release its parent's
lock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from causal.results.layout import LOCK_NAME
from causal.results.schema import ResultsLockedError

try:  # POSIX; elsewhere the lock falls back to an exclusively created file
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


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
