"""While a class is behind, its pods are listed at most once per RECHECK_SECONDS (per workload generation):
at 10,000 nodes a class's pod list is thousands of objects and DaemonSet status events come many times a
second during a rollout."""

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


def test_a_class_behind_lists_its_pods_once_per_window_and_again_after_a_spec_change(kube, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(deployment, "POD_READS", PodReads())
    monkeypatch.setattr(deployment, "time", SimpleNamespace(time=lambda: clock[0]))

    def reconcile():
        reconcile_deployment(kube, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))

    reconcile()
    clock[0] += RECHECK_SECONDS  # a later look: the DaemonSets have counted their pods
    daemonset_reports(kube, "digits-cpu-arm64", 1, 1)
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 0)
    add_pod(kube, "digits-nvidia-jetson-a", "nvidia-jetson", unschedulable(5))
    before = pod_lists(kube)
    reconcile()
    assert pod_lists(kube) == before + 1 and "Insufficient" in classes(kube)["nvidia-jetson"]["message"]
    for _ in range(5):  # DaemonSet events within the window: the last answer, no list
        clock[0] += RECHECK_SECONDS / 6
        reconcile()
    assert pod_lists(kube) == before + 1
    assert "Insufficient" in classes(kube)["nvidia-jetson"]["message"]
    clock[0] += RECHECK_SECONDS
    reconcile()
    assert pod_lists(kube) == before + 2

    ds = kube.stored("DaemonSet", "digits-nvidia-jetson", NS)  # a new template (generation): read at once
    ds["metadata"]["generation"] += 1
    reconcile()
    assert pod_lists(kube) == before + 3


def test_a_deleted_deployment_is_forgotten():
    reads = PodReads()
    reads.health(("ns", "a", "p"), 1, 0.0, lambda: None)
    reads.health(("ns", "b", "p"), 1, 0.0, lambda: None)
    reads.forget("ns", "a")
    assert list(reads._last) == [("ns", "b", "p")]
