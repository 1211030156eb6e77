"""The node watch: label changes reach the event loop once each, a 410 Gone lists again and tells of nodes
that left meanwhile, and a broken stream is retried."""

from __future__ import annotations

import asyncio
import threading

import pytest
from edgefleet.handlers.nodes import NodeWatch
from edgefleet.kube import ApiError, WatchExpired, _watch_event


class Fleet:
    """A Kube stand-in for the two calls NodeWatch makes: each watch plays the next script; after the last one the
    watch blocks until stopped."""

    def __init__(self, nodes, scripts):
        self.nodes, self.scripts, self.lists, self.watched_from = nodes, list(scripts), 0, []
        self.done = threading.Event()

    def list_labels_at(self, kind):
        self.lists += 1
        return dict(self.nodes), f"list-{self.lists}"

    def watch_labels(self, kind, version, seconds, opened):
        self.watched_from.append(version)
        if not self.scripts:
            self.done.set()
            threading.Event().wait(5)
            return
        for item in self.scripts.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def run(fleet, start):
    seen = []

    async def main():
        loop = asyncio.get_running_loop()
        watch = NodeWatch(fleet, loop, lambda name, labels: seen.append((name, labels)))
        watch.start(start, "v0")
        await asyncio.to_thread(fleet.done.wait, 10)
        await asyncio.sleep(0.05)
        watch.stop()

    asyncio.run(main())
    return seen


def test_changes_of_labels_are_told_once_and_heartbeats_not_at_all():
    fleet = Fleet({}, [[("MODIFIED", "a", {"x": "1"}, "v1"), ("MODIFIED", "a", {"x": "1"}, "v2"),
                        ("BOOKMARK", "", {}, "v3"), ("ADDED", "b", {"y": "2"}, "v4"), ("DELETED", "a", {}, "v5")]])
    assert run(fleet, {"a": {"x": "0"}}) == [("a", {"x": "1"}), ("b", {"y": "2"}), ("a", None)]
    assert fleet.watched_from == ["v0", "v5"] and fleet.lists == 0


def test_an_expired_version_lists_again_and_tells_of_nodes_that_left_meanwhile():
    fleet = Fleet({"b": {"y": "2"}}, [[WatchExpired("too old")]])
    assert run(fleet, {"a": {"x": "0"}, "b": {"y": "2"}}) == [("a", None)]
    assert fleet.watched_from == ["v0", "list-1"]


def test_a_broken_stream_is_retried_from_a_fresh_list(monkeypatch):
    monkeypatch.setattr("edgefleet.handlers.nodes.retry_delay", lambda _: 0.01)
    fleet = Fleet({"a": {"x": "1"}}, [[ConnectionResetError("reset")]])
    assert run(fleet, {"a": {"x": "0"}}) == [("a", {"x": "1"})]
    assert fleet.watched_from == ["v0", "list-1"]


def test_watch_events_are_parsed_and_errors_raised():
    assert _watch_event(b'{"type":"ADDED","object":{"metadata":{"name":"n","labels":{"a":"b"},'
                        b'"resourceVersion":"7"}}}') == ("ADDED", "n", {"a": "b"}, "7")
    assert _watch_event(b'{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}') == ("BOOKMARK", "", {},
                                                                                                   "9")
    with pytest.raises(WatchExpired):
        _watch_event(b'{"type":"ERROR","object":{"kind":"Status","code":410,"message":"too old"}}')
    with pytest.raises(ApiError):
        _watch_event(b'{"type":"ERROR","object":{"kind":"Status","code":500,"message":"boom"}}')
