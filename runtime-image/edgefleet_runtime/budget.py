"""One memory budget per process, shared by REST and gRPC: what request bodies and messages, and what decoding
them costs, may hold at once. A transport reserves a body's size before reading it (HTTP) or a message's before
parsing it (gRPC); decoding adds what it grows by (BYTES tensors); everything is given back when the request ends."""

from __future__ import annotations

import threading

DEFAULT_BYTES = 256 << 20


class MemoryBudget:
    def __init__(self, capacity: int = DEFAULT_BYTES):
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes if they fit; False (nothing reserved) otherwise."""
        with self._lock:
            if self.used + n > self.capacity:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class BudgetExceeded(Exception):
    """``held + n`` can never fit (``full`` False) or does not fit now (``full`` True: retry later)."""

    def __init__(self, needed: int, capacity: int, full: bool):
        super().__init__(needed, capacity, full)
        self.needed, self.capacity, self.full = needed, capacity, full


class Lease:
    """What one request holds of a budget; ``release`` gives it all back."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.held = 0

    def charge(self, n: int) -> None:
        """Hold ``n`` more bytes; BudgetExceeded when they do not fit."""
        if self.held + n > self.budget.capacity:
            raise BudgetExceeded(self.held + n, self.budget.capacity, False)
        if not self.budget.take(n):
            raise BudgetExceeded(self.held + n, self.budget.capacity, True)
        self.held += n

    def release(self) -> None:
        if self.held:
            self.budget.give(self.held)
            self.held = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
