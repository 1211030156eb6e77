"""Rollouts in waves on the real control plane: new variants reach the nodes wave by wave behind the
health gate, and a template that never becomes healthy is rolled back automatically."""

from __future__ import annotations

import datetime

import pytest
from kube_helpers import apply, condition, get, is_ready, items, wait_for
from operator_helpers import quickstart_into

pytestmark = pytest.mark.cluster
UNPULLABLE = "registry.invalid/edgefleet/unpullable:0"  # the dev cluster's kwok never readies it


def arm_pods(cluster, namespace):
    return [p for p in items(cluster, namespace, "pods", "-l", "edgefleet.io/profile=cpu-arm64")
            if not p["metadata"].get("deletionTimestamp")]


def arm_class(cluster, namespace) -> dict:
    ed = get(cluster, namespace, "edgedeployment", "digits")
    return next((c for c in ed.get("status", {}).get("classes", []) if c["profile"] == "cpu-arm64"), {})


def settled(cluster, namespace, digest=None):
    pods = arm_pods(cluster, namespace)
    cls = arm_class(cluster, namespace)
    ok = (cls.get("rollout") == "complete" and pods and all(is_ready(p) for p in pods)
          and len(pods) == cls["desired"] and (digest is None or cls["digest"] == digest))
    return (pods, cls) if ok else None


def created(pod) -> float:
    return datetime.datetime.fromisoformat(pod["metadata"]["creationTimestamp"].replace("Z", "+00:00")).timestamp()


@pytest.fixture
def waved(operator, cluster, namespace):
    """The quickstart on the arm64 Raspberry Pis only, rolled out in three waves."""
    docs = quickstart_into(cluster, namespace)
    ed = next(d for d in docs if d["kind"] == "EdgeDeployment")
    ed["spec"]["nodeSelector"] = {"matchLabels": {"edgefleet.io/device": "raspberry-pi-4"}}
    ed["spec"]["rollout"] = {"waves": [50, 100], "maxUnavailable": 1,
                             "healthGate": {"minReadySeconds": 2, "timeoutSeconds": 12}}
    apply(cluster, namespace, ed)
    pods, _ = wait_for(lambda: settled(cluster, namespace), timeout=180, what="first rollout complete")
    assert len(pods) == 2
    return namespace


def test_new_variant_rolls_out_wave_by_wave(waved, cluster):
    namespace = waved
    before = {p["metadata"]["name"] for p in arm_pods(cluster, namespace)}
    cluster.kubectl("patch", "edgemodel", "digits", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"optimization": {"quantization": "fp16"}}}')
    seen = set()

    def done():
        cls = arm_class(cluster, namespace)
        seen.add(cls.get("rollout"))
        em = get(cluster, namespace, "edgemodel", "digits")
        new = next((v for v in em["status"].get("variants", []) if v["profile"] == "cpu-arm64"), {})
        return new.get("precision") == "fp16" and settled(cluster, namespace, new.get("digest"))

    pods, cls = wait_for(done, timeout=180, every=0.3, what="the fp16 variant on every Pi")
    assert not before & {p["metadata"]["name"] for p in pods}, "every pod was replaced"
    assert "wave 1/2" in seen
    first, second = sorted(created(p) for p in pods)
    assert second - first >= 2, "the second wave started only after the first stayed Ready minReadySeconds"


def test_unhealthy_template_is_rolled_back(waved, cluster, edgefleet_api):
    namespace = waved
    healthy = arm_class(cluster, namespace)["digest"]
    profile = get(cluster, None, "hardwareprofile", "cpu-arm64")
    image = profile["spec"]["runtimeImage"]
    cluster.kubectl("patch", "hardwareprofile", "cpu-arm64", "--type=merge",
                    "-p", f'{{"spec": {{"runtimeImage": "{UNPULLABLE}"}}}}')
    try:
        def rolled_back():
            ed = get(cluster, namespace, "edgedeployment", "digits")
            degraded = condition(ed, "Degraded") or {}
            return degraded.get("reason") == "RolledBack" and ed

        ed = wait_for(rolled_back, timeout=120, what="automatic rollback")
        assert "health gate" in condition(ed, "Degraded")["message"]
        pods, cls = wait_for(lambda: (r := settled_on_old_image(cluster, namespace, image)) and r,
                             timeout=120, what="every Pi back on the healthy template")
        assert cls["rollout"] == "rolled back" and cls["digest"] == healthy
        events = items(cluster, namespace, "events", "--field-selector", "involvedObject.kind=EdgeDeployment")
        assert any(e["reason"] == "RolledBack" for e in events)
    finally:
        cluster.kubectl("patch", "hardwareprofile", "cpu-arm64", "--type=merge",
                        "-p", f'{{"spec": {{"runtimeImage": "{image}"}}}}')
    wait_for(lambda: settled(cluster, namespace) and condition(
        get(cluster, namespace, "edgedeployment", "digits"), "Degraded")["status"] == "False",
        timeout=120, what="healthy again once the profile is fixed")


def settled_on_old_image(cluster, namespace, image):
    pods = arm_pods(cluster, namespace)
    cls = arm_class(cluster, namespace)
    ok = pods and len(pods) == cls.get("desired") and all(
        is_ready(p) and p["spec"]["containers"][0]["image"] == image for p in pods)
    return (pods, cls) if ok else None
