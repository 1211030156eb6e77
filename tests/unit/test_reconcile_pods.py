"""Why a class's pods are not ready, from the pod objects alone."""

from __future__ import annotations

from edgefleet.reconcile.pods import class_health, pod_problem, scheduler_reason

NOW = 1_800_000_000.0
LONG_AGO = "2020-01-01T00:00:00Z"


def test_scheduler_reason_keeps_what_concerns_the_nodes_the_pod_may_use():
    assert scheduler_reason(
        "0/20 nodes are available: 1 Insufficient nvidia.com/gpu, 19 node(s) didn't match Pod's node "
        "affinity/selector. preemption: 0/20 nodes are available: 1 No preemption victims found for incoming "
        "pod, 19 Preemption is not helpful for scheduling.") == "Insufficient nvidia.com/gpu"
    assert scheduler_reason("0/3 nodes are available: 1 Insufficient cpu, 2 Insufficient memory.") == (
        "Insufficient cpu, Insufficient memory")
    assert scheduler_reason("0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.") == (
        "node(s) didn't match Pod's node affinity/selector")
    assert scheduler_reason("persistentvolumeclaim \"x\" not found") == "persistentvolumeclaim \"x\" not found"


def pending(message: str) -> dict:
    return {"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
         "lastTransitionTime": LONG_AGO}]}}


def test_starting_and_ready_pods_are_no_problem():
    creating = {"metadata": {"name": "p"}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "runtime", "state": {"waiting": {"reason": "ContainerCreating"}}}]}}
    ready = {"metadata": {"name": "p"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert pod_problem(creating, NOW) is None and pod_problem(ready, NOW) is None
    assert class_health([creating, ready], NOW).message is None


def test_problems_are_grouped_and_counted_over_live_pods():
    gpu = pending("0/4 nodes are available: 1 Insufficient nvidia.com/gpu, 3 node(s) didn't match Pod's node "
                  "affinity/selector.")
    image = {"metadata": {"name": "q", "namespace": "n"}, "status": {"containerStatuses": [
        {"name": "runtime", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                  "message": 'Back-off pulling image "x:1"'}}}]}}
    leaving = {**gpu, "metadata": {"name": "old", "deletionTimestamp": LONG_AGO}}
    health = class_health([gpu, gpu, image, leaving], NOW)
    assert health.message == ("2/3 pods Pending: Insufficient nvidia.com/gpu; "
                              '1/3 pods ImagePullBackOff: container runtime Back-off pulling image "x:1"')
    assert health.stuck.state == "Pending" and health.recheck is None
    assert "runtimeImage" in pod_problem(image, NOW).fix
