"""A quiet operator: a reconcile of an unchanged world sends no writes (children carry a hash of what was
rendered; status is patched only when it changed), a real change is still applied, and with the watch cache
(`CachedKube`) such a reconcile sends no request at all."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from edgefleet.api import builtin_profiles
from edgefleet.handlers import _child_event
from edgefleet.handlers.cache import Cache, CachedKube
from edgefleet.handlers.controller import Controller
from edgefleet.reconcile import World, deployment, reconcile_deployment, reconcile_profile
from edgefleet.reconcile.applied import SPEC_HASH
from edgefleet.render.workload import MANAGED_BY
from edgefleet.settings import Settings
from fake_kube import FakeKube

NS = "shop"
WRITES = ("apply", "patch_status", "delete")
NODES = {
    "jetson-0": {"kubernetes.io/arch": "arm64", "nvidia.com/gpu.present": "true",
                 "nvidia.com/gpu.product": "NVIDIA-Jetson-Orin-Nano"},
    "rpi-0": {"kubernetes.io/arch": "arm64"},
    "rpi-1": {"kubernetes.io/arch": "arm64"},
}


def variant(profile: str, digest_byte: str = "ab") -> dict:
    digest = "sha256:" + digest_byte * 32
    return {"profile": profile, "state": "Ready", "format": "onnx", "precision": "fp32", "digest": digest,
            "artifact": f"oci://registry.local/edgefleet@{digest}"}


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx"},
              "status": {"variants": [variant("cpu-arm64"), variant("nvidia-jetson")]}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": NS}, "spec": {"modelRef": {"name": "digits"}}})
    return fake


def reconcile(kube) -> float | None:
    return reconcile_deployment(kube, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))


def settle(kube: FakeKube) -> None:
    """Play the DaemonSet controller: every pod of every DaemonSet updated and Ready."""
    for (kind, ns, name), obj in list(kube.objects.items()):
        if kind == "DaemonSet":
            n = 1 if "jetson" in name else 2
            kube.set_status(kind, name, ns, {"observedGeneration": obj["metadata"]["generation"],
                                             "desiredNumberScheduled": n, "numberReady": n,
                                             "updatedNumberScheduled": n})


def writes(kube: FakeKube, since: int = 0) -> list[tuple]:
    return [c for c in kube.calls[since:] if c[0] in WRITES]


def test_children_carry_the_hash_of_what_was_rendered(kube):
    reconcile(kube)
    for kind, name in (("DaemonSet", "digits-cpu-arm64"), ("DaemonSet", "digits-nvidia-jetson"),
                       ("Service", "digits")):
        assert len(kube.stored(kind, name, NS)["metadata"]["annotations"][SPEC_HASH]) == 16


def test_second_reconcile_of_an_unchanged_world_sends_no_writes(kube):
    reconcile(kube)
    settle(kube)
    reconcile(kube)  # the status changed (pods Ready): one status patch
    before, events = len(kube.calls), len(kube.events)
    assert reconcile(kube) is None
    assert writes(kube, before) == []
    assert len(kube.events) == events


def test_a_changed_variant_is_applied_to_its_class_only(kube):
    reconcile(kube)
    settle(kube)
    reconcile(kube)
    kube.set_status("EdgeModel", "digits", NS, {"variants": [variant("cpu-arm64", "cd"), variant("nvidia-jetson")]})
    before = len(kube.calls)
    reconcile(kube)
    assert [c for c in writes(kube, before) if c[0] == "apply"] == [("apply", "DaemonSet", "digits-cpu-arm64")]
    template = kube.stored("DaemonSet", "digits-cpu-arm64", NS)["spec"]["template"]
    assert template["metadata"]["annotations"]["edgefleet.io/variant-digest"] == "sha256:" + "cd" * 32


def test_a_child_deleted_behind_our_back_is_applied_again(kube):
    reconcile(kube)
    kube.objects.pop(("DaemonSet", NS, "digits-nvidia-jetson"))
    before = len(kube.calls)
    reconcile(kube)
    assert ("apply", "DaemonSet", "digits-nvidia-jetson") in writes(kube, before)
    assert kube.stored("DaemonSet", "digits-nvidia-jetson", NS) is not None


def test_a_disabled_service_is_deleted_once(kube):
    reconcile(kube)
    kube.stored("EdgeDeployment", "digits", NS)["spec"]["service"] = {"enabled": False}
    reconcile(kube)
    assert kube.stored("Service", "digits", NS) is None
    before = len(kube.calls)
    reconcile(kube)
    assert not [c for c in writes(kube, before) if c[1] == "Service"]


def test_with_the_watch_cache_a_resync_sends_no_request(kube):
    cache = Cache()
    cache.prime(kube, {"app.kubernetes.io/managed-by": MANAGED_BY})
    cached = CachedKube(kube, cache)
    reconcile_deployment(cached, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))
    settle(kube)
    for name in ("digits-cpu-arm64", "digits-nvidia-jetson"):  # the watch delivers the controller's status
        cache.put("DaemonSet", kube.stored("DaemonSet", name, NS))
    reconcile_deployment(cached, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))
    before = len(kube.calls)
    reconcile_deployment(cached, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))
    assert kube.calls[before:] == []  # not even a read
    assert cache.get("EdgeDeployment", NS, "digits")["status"]["nodesReady"] == "3/3"  # its own status write


def test_the_cache_keeps_the_newer_version():
    cache = Cache()
    obj = {"metadata": {"name": "digits", "namespace": NS, "resourceVersion": "12"}, "spec": {"x": 2}}
    cache.put("EdgeDeployment", obj)
    cache.put("EdgeDeployment", {"metadata": {**obj["metadata"], "resourceVersion": "11"}, "spec": {"x": 1}})
    assert cache.get("EdgeDeployment", NS, "digits")["spec"] == {"x": 2}
    cache.drop("EdgeDeployment", NS, "digits")
    assert cache.get("EdgeDeployment", NS, "digits") is None


def test_the_cache_lists_children_by_label():
    cache = Cache()
    for name, owner in (("a-cpu", "a"), ("b-cpu", "b")):
        labels = {"edgefleet.io/deployment": owner}
        cache.put("DaemonSet", {"metadata": {"name": name, "namespace": NS, "labels": labels,
                                             "managedFields": [{"manager": "x"}]}})
    found = cache.list("DaemonSet", NS, {"edgefleet.io/deployment": "a"})
    assert [o["metadata"]["name"] for o in found] == ["a-cpu"]
    assert "managedFields" not in found[0]["metadata"]
    assert cache.list("DaemonSet", "elsewhere", None) == []


def test_an_unchanged_profile_sends_no_status_patch():
    kube = FakeKube()
    kube.add(next(p for p in builtin_profiles() if p.metadata["name"] == "cpu-arm64").to_dict())
    reconcile_profile(kube, "cpu-arm64", World(dict(NODES), builtin_profiles()))
    before = len(kube.calls)
    reconcile_profile(kube, "cpu-arm64", World(dict(NODES), builtin_profiles()))
    assert writes(kube, before) == []


def ds_counts(kube: FakeKube, name: str, desired: int, ready: int) -> None:
    ds = kube.stored("DaemonSet", name, NS)
    kube.set_status("DaemonSet", name, NS, {"observedGeneration": ds["metadata"]["generation"],
                                            "desiredNumberScheduled": desired, "numberReady": ready,
                                            "updatedNumberScheduled": desired})


def test_pods_are_listed_only_for_a_class_that_made_no_progress(kube, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(deployment, "POD_READS", deployment.PodReads())
    monkeypatch.setattr(deployment, "time", SimpleNamespace(time=lambda: clock[0]))
    reconcile(kube)
    ds_counts(kube, "digits-cpu-arm64", 2, 1)
    ds_counts(kube, "digits-nvidia-jetson", 1, 0)
    asked: list[dict] = []
    list_ = kube.list
    kube.list = lambda kind, ns=None, labels=None: asked.append(labels or {}) or list_(kind, ns, labels)
    clock[0] += deployment.RECHECK_SECONDS
    reconcile(kube)  # cpu-arm64: 0 -> 1 Ready (starting); nvidia-jetson: still 0 Ready
    assert [a.get("edgefleet.io/profile") for a in asked if "edgefleet.io/profile" in a] == ["nvidia-jetson"]
    before = len(kube.calls)
    clock[0] += deployment.RECHECK_SECONDS
    reconcile(kube)  # neither moved for RECHECK_SECONDS: both are looked at
    assert len([c for c in kube.calls[before:] if c[:2] == ("list", "Pod")]) == 2


def test_child_status_changes_are_collected_and_a_deleted_child_is_replaced_at_once():
    async def main():
        ctl = Controller(kube=None, settings=Settings(child_settle_seconds=5.0))
        queue = ctl.add_queue("EdgeDeployment", lambda *_: None, 1)
        memo = SimpleNamespace(controller=ctl)
        labels = {"edgefleet.io/deployment": "digits"}
        for _ in range(50):  # a rollout: the DaemonSet's status changes with every pod
            _child_event("MODIFIED", NS, labels, memo)
        pending = (set(queue.dirty), set(queue.timers))
        _child_event("DELETED", NS, labels, memo)
        for timer in queue.timers.values():
            timer.cancel()
        return pending, set(queue.dirty)

    (dirty, timers), after_delete = asyncio.run(main())
    assert dirty == set() and timers == {(NS, "digits")}  # one look, later
    assert after_delete == {(NS, "digits")}
