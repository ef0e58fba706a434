"""One writer per dataset: ``writer.lock`` names the holder (host, pid, start); stale locks are taken over.

A second writer is refused with the holder named, before it touches anything (it would otherwise delete
the first writer's open shards as leftovers of a crash). A lock is stale when its holder's process is
gone (same host) or its heartbeat, refreshed at every committed shard, is older than ``stale_after``
seconds (another host, whose processes this one cannot see).

On a local disk the lock file is created exclusively (``O_EXCL``). Object stores have no exclusive
create: there the lock is written, read back and its token compared, which narrows the race between
two writers starting in the same second but cannot close it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.fs import Location

logger = logging.getLogger(__name__)

LOCK_FILE = "writer.lock"
STALE_AFTER = 3600.0  # seconds without a heartbeat after which another host's lock counts as abandoned


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class DatasetLock:
    """The writer lock of the dataset at ``location``: ``acquire``, ``heartbeat`` while writing, ``release``."""

    def __init__(self, location: Location, *, stale_after: float = STALE_AFTER) -> None:
        self.location, self.stale_after = location, stale_after
        self.path = location.path(LOCK_FILE)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.started = time.time()
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise DatasetError naming the live holder; a stale lock is taken over with a warning."""
        if not self._create():
            current = self._read()
            if current is not None and not self._is_stale(current):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.get("started", 0)))
                problem = (
                    f"being written by host {current.get('host')} pid {current.get('pid')} since {since} "
                    f"({LOCK_FILE}); one writer per dataset: wait for it, or delete {self.path} if that writer is gone"
                )
                raise DatasetError(self.location.uri, problem)
            logger.warning("taking over a stale writer lock of %s: %s", self.location.uri, current)
            self.location.fs.delete_file(self.path)
            if not self._create():
                raise DatasetError(self.location.uri, f"another writer took {LOCK_FILE} at the same moment")
        self.held = True

    def heartbeat(self) -> None:
        """Refresh the lock's timestamp, so other hosts see the writer is alive."""
        if self.held:
            self.location.write_atomically(self.path, self._payload())

    def release(self) -> None:
        """Drop the lock, if this writer still holds it."""
        if self.held and (self._read() or {}).get("token") == self.holder["token"]:
            self.location.fs.delete_file(self.path)
        self.held = False

    def _payload(self) -> bytes:
        return json.dumps({**self.holder, "started": self.started, "heartbeat": time.time()}).encode()

    def _create(self) -> bool:
        """Create the lock file unless one exists; True when this writer made it."""
        if isinstance(self.location.fs, pafs.LocalFileSystem):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(self._payload())
            return True
        if self.location.exists(self.path):
            return False
        self.location.write_atomically(self.path, self._payload())
        return (self._read() or {}).get("token") == self.holder["token"]

    def _read(self) -> dict[str, Any] | None:
        """The lock's content; None when it vanished or is unreadable (a writer died while writing it)."""
        try:
            return json.loads(self.location.read_bytes(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def _is_stale(self, current: dict[str, Any]) -> bool:
        if current.get("host") == self.holder["host"] and isinstance(current.get("pid"), int):
            return not _process_alive(current["pid"])
        return time.time() - float(current.get("heartbeat", 0)) > self.stale_after
