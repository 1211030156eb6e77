"""Work queue between Kopf's watch events and the level-based reconcilers.

Events only mark objects dirty; a worker per kind waits a short settle time (so a burst of node
events causes one reconcile), then reconciles each dirty object in a thread. The same object is never
reconciled twice at once, and a resync marks everything now and then. Failures are split as Kopf
splits them: transient ones retry with exponential backoff and full jitter (so many objects failing
together do not retry in lockstep); a PermanentError waits for the next change or resync
(reconcilers report those in status themselves).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..kube import Kube
from ..reconcile import World
from ..reconcile.errors import PermanentError
from ..reconcile.world import parse_profiles
from ..settings import Settings
from .metrics import FLEET_NODES, QUEUE_DEPTH, RECONCILE_SECONDS, RECONCILES

log = logging.getLogger("edgefleet.controller")
Key = tuple[str, str]  # (namespace, name)
MAX_BACKOFF = 60.0
FIRST_BACKOFF = 1.0


def retry_delay(failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number `failures` (1, 2, ...): exponential, capped, with jitter in its upper half."""
    ceiling = min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** failures)
    return ceiling / 2 + rand() * ceiling / 2


@dataclass
class Queue:
    name: str
    reconcile: Callable[[str, str, World], float | None]  # returns seconds until the next look, if any
    concurrency: int
    dirty: set[Key] = field(default_factory=set)
    known: set[Key] = field(default_factory=set)
    running: set[Key] = field(default_factory=set)
    failures: dict[Key, int] = field(default_factory=dict)
    generations: dict[Key, int | None] = field(default_factory=dict)  # last spec generation seen
    timers: dict[Key, asyncio.TimerHandle] = field(default_factory=dict)  # one pending re-look per object
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def mark(self, key: Key) -> None:
        self.dirty.add(key)
        self.wake.set()

    def mark_all(self) -> None:
        for key in self.known:
            self.mark(key)

    def mark_later(self, key: Key, delay: float) -> None:
        """Look at `key` again in `delay` seconds; an earlier pending look wins over a later one."""
        loop = asyncio.get_running_loop()
        pending = self.timers.get(key)
        if pending is not None and not pending.cancelled() and pending.when() <= loop.time() + delay:
            return
        if pending is not None:
            pending.cancel()
        self.timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        self.timers.pop(key, None)
        self.mark(key)

    def forget(self, key: Key) -> None:
        self.known.discard(key)
        self.dirty.discard(key)
        self.generations.pop(key, None)
        self.failures.pop(key, None)
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()


@dataclass
class Controller:
    kube: Kube
    settings: Settings
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    profiles: dict[str, dict] = field(default_factory=dict)
    model_of: dict[Key, str] = field(default_factory=dict)  # EdgeDeployment -> its EdgeModel name
    queues: dict[str, Queue] = field(default_factory=dict)

    def world(self) -> World:
        FLEET_NODES.set(len(self.nodes))
        return World(dict(self.nodes), parse_profiles(list(self.profiles.values())))

    def add_queue(self, name: str, reconcile: Callable[[str, str, World], float | None], concurrency: int) -> Queue:
        self.queues[name] = Queue(name, reconcile, concurrency)
        return self.queues[name]

    def fleet_changed(self) -> None:
        for q in self.queues.values():
            q.mark_all()

    async def run(self, queue: Queue, stopped: asyncio.Event) -> None:
        slots = asyncio.Semaphore(queue.concurrency)
        tasks: set[asyncio.Task] = set()
        while not stopped.is_set():
            await queue.wake.wait()
            await asyncio.sleep(self.settings.settle_seconds)
            queue.wake.clear()
            ready = queue.dirty - queue.running
            queue.dirty -= ready
            QUEUE_DEPTH.labels(queue.name).set(len(queue.dirty))
            for key in sorted(ready):
                await slots.acquire()
                queue.running.add(key)
                task = asyncio.create_task(self._one(queue, key, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        for task in tasks:
            task.cancel()

    async def _one(self, queue: Queue, key: Key, slots: asyncio.Semaphore) -> None:
        try:
            with RECONCILE_SECONDS.labels(queue.name).time():
                again = await asyncio.to_thread(queue.reconcile, key[0], key[1], self.world())
            RECONCILES.labels(queue.name, "ok").inc()
            queue.failures.pop(key, None)
            if again:
                queue.mark_later(key, again)
        except PermanentError as err:
            RECONCILES.labels(queue.name, "permanent").inc()
            queue.failures.pop(key, None)
            log.error("%s %s/%s failed; retried at the next change or resync: %s", queue.name, *key, err)
        except Exception as err:  # noqa: BLE001 - anything else is transient: retried, never fatal
            RECONCILES.labels(queue.name, "error").inc()
            count = queue.failures[key] = queue.failures.get(key, 0) + 1
            delay = retry_delay(count)
            log.warning("%s %s/%s failed (attempt %d, retry in %.1fs): %s", queue.name, *key, count, delay, err)
            queue.mark_later(key, delay)
        finally:
            queue.running.discard(key)
            slots.release()
            if key in queue.dirty:
                queue.wake.set()

    async def resync(self, stopped: asyncio.Event) -> None:
        while not stopped.is_set():
            await asyncio.sleep(self.settings.resync_seconds)
            self.fleet_changed()
