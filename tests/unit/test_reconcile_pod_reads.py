"""A class behind has its pods listed only once it has made no progress (no more pods Ready) for
RECHECK_SECONDS, then at most once per RECHECK_SECONDS: at 10,000 nodes a class's pod list is thousands of
objects and DaemonSet status events come many times a second during a rollout."""

from __future__ import annotations

from types import SimpleNamespace

from edgefleet.api import builtin_profiles
from edgefleet.reconcile import World, deployment, reconcile_deployment
from edgefleet.reconcile.deployment import RECHECK_SECONDS, PodReads
from edgefleet.settings import Settings
from test_reconcile_deployment import NODES, NS, add_pod, classes, daemonset_reports, unschedulable
from test_reconcile_deployment import kube as kube  # noqa: F401  (the fixture)


def pod_lists(fake) -> int:
    return sum(1 for verb, kind, _ in fake.calls if (verb, kind) == ("list", "Pod"))


def _clocked(kube, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(deployment, "POD_READS", PodReads())
    monkeypatch.setattr(deployment, "time", SimpleNamespace(time=lambda: clock[0]))

    def reconcile():
        reconcile_deployment(kube, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))

    return clock, reconcile


def test_a_stalled_class_lists_its_pods_once_per_window_and_a_new_spec_starts_the_wait_again(kube, monkeypatch):
    clock, reconcile = _clocked(kube, monkeypatch)
    reconcile()
    assert pod_lists(kube) == 0  # just made: starting
    clock[0] += RECHECK_SECONDS  # the DaemonSets have counted their pods; nvidia-jetson made no progress since
    daemonset_reports(kube, "digits-cpu-arm64", 1, 1)
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 0)
    add_pod(kube, "digits-nvidia-jetson-a", "nvidia-jetson", unschedulable(5))
    reconcile()
    assert pod_lists(kube) == 1 and "Insufficient" in classes(kube)["nvidia-jetson"]["message"]
    for _ in range(5):  # DaemonSet events within the window: the last answer, no list
        clock[0] += RECHECK_SECONDS / 6
        reconcile()
    assert pod_lists(kube) == 1
    assert "Insufficient" in classes(kube)["nvidia-jetson"]["message"]
    clock[0] += RECHECK_SECONDS
    reconcile()
    assert pod_lists(kube) == 2

    ds = kube.stored("DaemonSet", "digits-nvidia-jetson", NS)  # a new template (generation): starting again
    ds["metadata"]["generation"] += 1
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 0)
    reconcile()
    assert pod_lists(kube) == 2
    clock[0] += RECHECK_SECONDS
    reconcile()
    assert pod_lists(kube) == 3


def test_a_class_whose_pods_keep_becoming_ready_is_never_listed_until_it_stalls(kube, monkeypatch):
    clock, reconcile = _clocked(kube, monkeypatch)
    reconcile()
    for other in [n for k, _, n in kube.objects if k == "DaemonSet" and n != "digits-nvidia-jetson"]:
        daemonset_reports(kube, other, 1, 1)  # the other classes are done
    for ready in range(12):  # one more pod Ready every 5 s for a minute
        clock[0] += 5
        daemonset_reports(kube, "digits-nvidia-jetson", 20, ready)
        reconcile()
    assert pod_lists(kube) == 0
    clock[0] += RECHECK_SECONDS - 1
    reconcile()
    assert pod_lists(kube) == 0
    clock[0] += 1
    reconcile()
    assert pod_lists(kube) == 1


def test_a_deleted_deployment_is_forgotten():
    reads = PodReads()
    reads.health(("ns", "a", "p"), 1, 0, 0.0, lambda: None)
    reads.health(("ns", "b", "p"), 1, 0, 0.0, lambda: None)
    reads.forget("ns", "a")
    assert list(reads._progress) == [("ns", "b", "p")]
