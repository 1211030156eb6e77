"""A bounded, ordered, on-disk queue (SQLite, WAL): results wait here until their sink acknowledges them.
Full, it drops the oldest and counts them; it never grows past ``max_items`` rows of at most ``max_item_bytes``."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    seq: int
    captured: float  # when the frame was captured (time.time())
    body: bytes


class QueueFullItem(ValueError):
    """An item larger than the queue's per-item cap."""


class DiskQueue:
    def __init__(self, path: str, max_items: int, max_item_bytes: int = 1 << 20):
        if max_items < 1:
            raise ValueError("queue maxItems must be at least 1")
        self.max_items, self.max_item_bytes = max_items, max_item_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last commits, never corrupt
        self._db.execute("CREATE TABLE IF NOT EXISTS items (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "captured REAL NOT NULL, body BLOB NOT NULL)")
        self._depth = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        self.dropped = 0  # oldest items dropped because the queue was full (since start)

    def __len__(self) -> int:
        return self._depth

    def put(self, body: bytes, captured: float) -> int:
        """Append one item; drops (and returns the number of) the oldest when the queue is over ``max_items``."""
        if len(body) > self.max_item_bytes:
            raise QueueFullItem(f"result of {len(body)} bytes is over the queue's item cap {self.max_item_bytes}")
        with self._lock:
            self._db.execute("INSERT INTO items (captured, body) VALUES (?, ?)", (captured, body))
            self._depth += 1
            over = self._depth - self.max_items
            if over > 0:
                self._db.execute("DELETE FROM items WHERE seq IN (SELECT seq FROM items ORDER BY seq LIMIT ?)",
                                 (over,))
                self._depth -= over
                self.dropped += over
            return max(over, 0)

    def peek(self, n: int) -> list[Item]:
        """The oldest ``n`` items, oldest first (not removed)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, captured, body FROM items ORDER BY seq LIMIT ?", (n,)).fetchall()
        return [Item(*r) for r in rows]

    def ack(self, upto: int) -> None:
        """Remove every item up to and including ``upto`` (delivered)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM items WHERE seq <= ?", (upto,))
            self._depth -= cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
