"""The controller's retry policy: transient failures back off with jitter, permanent ones wait for a change."""

from __future__ import annotations

import asyncio

from edgefleet.handlers.controller import MAX_BACKOFF, Controller, retry_delay
from edgefleet.reconcile.errors import PermanentError
from edgefleet.settings import Settings


def test_backoff_doubles_with_jitter_in_the_upper_half_and_is_capped():
    for failures in range(1, 12):
        ceiling = min(MAX_BACKOFF, 2.0 ** failures)
        assert retry_delay(failures, lambda: 0.0) == ceiling / 2
        assert retry_delay(failures, lambda: 1.0) == ceiling
    spread = {round(retry_delay(3), 3) for _ in range(50)}
    assert len(spread) > 10 and all(4.0 <= d <= 8.0 for d in spread)  # objects failing together spread out


def run_once(error: Exception) -> set:
    """One reconcile of key ("ns", "a") that raises `error`; the keys with a retry scheduled."""
    def reconcile(namespace, name, world):
        raise error

    async def main():
        ctl = Controller(kube=None, settings=Settings())
        queue = ctl.add_queue("EdgeDeployment", reconcile, 1)
        slots = asyncio.Semaphore(1)
        await slots.acquire()
        queue.running.add(("ns", "a"))
        await ctl._one(queue, ("ns", "a"), slots)
        scheduled = set(queue.timers)
        for timer in queue.timers.values():
            timer.cancel()
        return scheduled, queue.failures

    return asyncio.run(main())


def test_transient_failure_is_retried_later():
    scheduled, failures = run_once(RuntimeError("connection reset"))
    assert scheduled == {("ns", "a")} and failures == {("ns", "a"): 1}


def test_permanent_failure_is_not_retried():
    scheduled, failures = run_once(PermanentError("InvalidManifest", "refused", "change the field"))
    assert scheduled == set() and failures == {}


def test_which_api_errors_are_permanent():
    from edgefleet.reconcile.errors import as_permanent
    from edgefleet.render.placement import PlacementError
    from fake_kube import api_error, no_namespace

    what = "DaemonSet ns/x"
    assert as_permanent(api_error(422, "spec.x: Invalid value", "Invalid"), what).reason == "InvalidManifest"
    assert as_permanent(api_error(403, "daemonsets.apps is forbidden: User cannot patch", "Forbidden"),
                        what).reason == "Forbidden"
    assert as_permanent(api_error(400, "bad request body", "BadRequest"), what).reason == "RequestRefused"
    missing = as_permanent(no_namespace("edge"), what)
    assert missing.reason == "NamespaceNotFound" and "kubectl create namespace edge" in missing.fix
    unknown_kind = as_permanent(api_error(404, "the server could not find the requested resource", "NotFound"), what)
    assert unknown_kind.reason == "NotFound" and "CustomResourceDefinition" in unknown_kind.fix
    terminating = 'daemonsets.apps "x" is forbidden: unable to create new content in namespace ns because it is ' \
                  "being terminated"
    for transient in (api_error(500, "etcd"), api_error(503, "unavailable"), api_error(429, "slow down"),
                      api_error(409, "the object has been modified"), api_error(403, terminating, "Forbidden"),
                      RuntimeError("connection reset")):
        assert as_permanent(transient, what) is None, transient
    placement = as_permanent(PlacementError("too many terms", "give profiles distinct priorities"), what)
    assert (placement.reason, placement.fix) == ("PlacementConflict", "give profiles distinct priorities")
    assert str(placement) == f"{what}: too many terms. Fix: give profiles distinct priorities"
