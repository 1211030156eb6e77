"""The fleet's node labels, kept by a metadata-only watch in a thread of its own.

Kopf's watch would hand every node to a handler as a full object (status, images, conditions: several KB each,
and a list of 10,000 of them at start-up); placement needs only names and labels. The watch asks the API server
for metadata only, starts from the start-up list's resourceVersion, lists again after a 410 Gone or an error,
and tells the event loop of each change of labels (heartbeats change none).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..kube import Kube, WatchExpired
from .controller import retry_delay

log = logging.getLogger(__name__)
Labels = dict[str, dict[str, str]]


class NodeWatch:
    def __init__(self, kube: Kube, loop: asyncio.AbstractEventLoop, changed: Callable[[str, dict | None], None],
                 seconds: int = 300) -> None:
        self.kube, self.loop, self.changed, self.seconds = kube, loop, changed, seconds
        self.stopped = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name="edgefleet-node-watch", daemon=True)

    def start(self, nodes: Labels, version: str) -> None:
        self._known, self._version = dict(nodes), version
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        response = self._response
        if response is not None:
            response.shutdown()  # ends a read blocked on the stream

    def _run(self) -> None:
        failures = 0
        while not self.stopped.is_set():
            try:
                if not self._version:
                    self._relist()
                self._follow()
                failures = 0
            except WatchExpired:
                log.info("the node watch's resourceVersion expired: listing the nodes again")
                self._version = ""
            except Exception as err:  # noqa: BLE001 - a broken stream or API error: list again after a pause
                if self.stopped.is_set():
                    return  # stop() shut the stream
                failures += 1
                delay = retry_delay(failures)
                log.warning("the node watch failed (attempt %d, again in %.1fs): %s", failures, delay, err)
                self._version = ""
                self.stopped.wait(delay)

    def _follow(self) -> None:
        for kind, name, labels, version in self.kube.watch_labels("Node", self._version, self.seconds,
                                                                  self._opened):
            if self.stopped.is_set():
                return
            self._version = version or self._version
            if kind == "DELETED":
                self._tell(name, None)
            elif kind in ("ADDED", "MODIFIED"):
                self._tell(name, labels)

    def _opened(self, response: Any) -> None:
        self._response = response

    def _relist(self) -> None:
        nodes, self._version = self.kube.list_labels_at("Node")
        for name in set(self._known) - set(nodes):
            self._tell(name, None)
        for name, labels in nodes.items():
            self._tell(name, labels)

    def _tell(self, name: str, labels: dict[str, str] | None) -> None:
        """Pass a change of labels (None: the node is gone) to the event loop."""
        if labels is None:
            if name not in self._known:
                return
            del self._known[name]
        elif self._known.get(name) == labels:
            return
        else:
            self._known[name] = labels
        try:
            self.loop.call_soon_threadsafe(self.changed, name, labels)
        except RuntimeError:  # the loop is closed: the operator stopped
            self.stopped.set()
