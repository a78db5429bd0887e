"""An advisory writer lock per zoo store, so two builds (or a build and an `--overwrite`) never share a store.

Local stores: the lock is the file `<store>.lock` next to the store, holding {pid, host, started, command}. It is
held with `flock` on an open descriptor, so the kernel releases it when the holder dies however it dies; a later
writer that finds the file but gets the flock takes it over and says whose stale lock it was. `memory://` stores
live in one process: the lock is a set of URLs in that process. Other fsspec URLs (object stores) get no lock:
they have no atomic create-if-absent with liveness, so run one writer per store there. Readers never lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.errors import StoreBusyError, StoreError

__all__ = ["StoreLock", "lock_path"]

log = logging.getLogger(__name__)
_MEMORY_HELD: set[str] = set()
_MEMORY_GUARD = threading.Lock()


def lock_path(url: str) -> Path | None:
    """The lock file of a local store (None for URLs that are not local files)."""
    if url.startswith("memory://") or ("://" in url and not url.startswith("file://")):
        return None
    path = Path(url.removeprefix("file://")).absolute()
    return path.with_name(path.name + ".lock")


def _holder_text(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {info.get('started', '?')}, "
            f"command: {info.get('command', '?')})")


class StoreLock:
    """Context manager: the writer lock of the store at `url`; raises StoreBusyError naming the holder."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = lock_path(url)
        self._fd: int | None = None
        self._memory = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise StoreBusyError; a lock left by a dead process is taken over with a warning."""
        if self.url.startswith("memory://"):
            with _MEMORY_GUARD:
                if self.url in _MEMORY_HELD:
                    raise StoreBusyError(f"{self.url} is being written by another build in this process; wait for it")
                _MEMORY_HELD.add(self.url)
            self._memory = True
            return
        if self.path is None:
            return  # object stores: no lock (see the module docstring)
        for _ in range(20):  # retried only when the holder removed the file between our open and our flock
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise StoreError(f"cannot create the lock file {self.path} for {self.url}: {err.strerror or err}; "
                                 "choose an --out in a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                raise StoreBusyError(
                    f"{self.url} is being written by {_holder_text(info)}; wait for it to finish or stop it "
                    f"(lock file {self.path})"
                ) from None
            except OSError as err:  # e.g. ENOLCK: a file system without flock support
                os.close(fd)
                raise StoreError(f"cannot lock {self.path} for {self.url}: {err.strerror or err}; put the store on a "
                                 "file system that supports file locks") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read_info(fd)
            if old:
                log.warning("%s: taking over the stale lock of %s: that process is gone", self.url, _holder_text(old))
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return
        raise StoreBusyError(f"{self.url}: could not take the lock file {self.path}; another writer keeps replacing it")

    def release(self) -> None:
        """Drop the lock and remove its file (the file is unlinked before the flock goes, so no one inherits it)."""
        if self._memory:
            with _MEMORY_GUARD:
                _MEMORY_HELD.discard(self.url)
            self._memory = False
        if self._fd is not None:
            try:
                if self.path is not None:
                    self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = None


def _read_info(fd: int) -> dict[str, Any]:
    """The holder recorded in the lock file ({} when empty; "?" fields when unreadable)."""
    try:
        data = os.pread(fd, 4096, 0)
    except OSError:
        return {"pid": "?", "host": "?"}
    if not data:
        return {}
    try:
        info = json.loads(data.decode())
    except ValueError:
        info = None
    return info if isinstance(info, dict) else {"pid": "?", "host": "?"}
