"""A bounded, ordered, on-disk queue (SQLite, WAL): results wait here until their sink acknowledges them.
Full, it drops the oldest and counts them; it never holds more than ``max_items`` rows of at most ``max_item_bytes``
each, nor more than ``max_bytes`` of results together (the file stays near its peak: SQLite reuses freed pages)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Item:
    seq: int
    captured: float  # when the frame was captured (time.time())
    body: bytes


class QueueFullItem(ValueError):
    """An item larger than the queue's per-item cap."""


class DiskQueue:
    def __init__(self, path: str, max_items: int, max_item_bytes: int = 1 << 20, max_bytes: int | None = None):
        if max_items < 1:
            raise ValueError("queue maxItems must be at least 1")
        self.max_items, self.max_item_bytes = max_items, max_item_bytes
        self.max_bytes = max(max_bytes, max_item_bytes) if max_bytes is not None else None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last commits, never corrupt
        self._db.execute("CREATE TABLE IF NOT EXISTS items (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "captured REAL NOT NULL, body BLOB NOT NULL)")
        self._depth, self._bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM items"
                                                    ).fetchone()
        self.dropped = 0  # oldest items dropped because the queue was full (since start)

    def __len__(self) -> int:
        return self._depth

    @property
    def size(self) -> int:
        """Bytes of the results waiting."""
        return self._bytes

    def put(self, body: bytes, captured: float) -> int:
        """Append one item; drops (and returns the number of) the oldest while the queue is over ``max_items`` or
        ``max_bytes``."""
        if len(body) > self.max_item_bytes:
            raise QueueFullItem(f"result of {len(body)} bytes is over the queue's item cap {self.max_item_bytes}")
        with self._lock:
            self._db.execute("INSERT INTO items (captured, body) VALUES (?, ?)", (captured, body))
            self._depth += 1
            self._bytes += len(body)
            over = self._depth - self.max_items
            if self.max_bytes is not None and self._bytes > self.max_bytes:
                over = max(over, self._oldest_over(self._bytes - self.max_bytes))
            if over <= 0:
                return 0
            rows = self._db.execute("DELETE FROM items WHERE seq IN (SELECT seq FROM items ORDER BY seq LIMIT ?) "
                                    "RETURNING LENGTH(body)", (over,)).fetchall()
            self._depth -= len(rows)
            self._bytes -= sum(r[0] for r in rows)
            self.dropped += len(rows)
            return len(rows)

    def _oldest_over(self, excess: int) -> int:
        """How many of the oldest items hold at least ``excess`` bytes together."""
        total, n = 0, 0
        for (size,) in self._db.execute("SELECT LENGTH(body) FROM items ORDER BY seq"):  # ends once enough
            total, n = total + size, n + 1
            if total >= excess:
                break
        return n

    def peek(self, n: int) -> list[Item]:
        """The oldest ``n`` items, oldest first (not removed)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, captured, body FROM items ORDER BY seq LIMIT ?", (n,)).fetchall()
        return [Item(*r) for r in rows]

    def ack(self, upto: int) -> None:
        """Remove every item up to and including ``upto`` (delivered)."""
        with self._lock:
            rows = self._db.execute("DELETE FROM items WHERE seq <= ? RETURNING LENGTH(body)", (upto,)).fetchall()
            self._depth -= len(rows)
            self._bytes -= sum(r[0] for r in rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class FolderLock:
    """One pipeline per queue folder: an exclusive flock on ``folder/.lock``, held until close (or the process
    ends). A second pipeline of the same deployment on the node (a surge pod of a rollout) waits for it."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")
        self._file: TextIO | None = None

    def acquire(self, stop: threading.Event, on_wait: Callable[[], None] | None = None) -> bool:
        """Wait until the lock is ours (True) or ``stop`` is set (False)."""
        f = open(self.path, "a")  # noqa: SIM115 - held open while locked
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait()
                    told = True
                if stop.wait(0.5):
                    f.close()
                    return False
                continue
            self._file = f
            return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the flock
            self._file = None
