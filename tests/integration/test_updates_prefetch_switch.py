"""spec.rollout.prefetch on the real control plane with the kwok fleet. Kwok's pods run no runtime: no node ever
reports the new variant in its cache, which is what a fleet cut off from the registry looks like. The update must
stay in prefetch: the pods carry the prefetch order (an annotation, the runtime's downward-API control file), no
pod template changes, no pod restarts, nothing is told to activate, and after the deadline the deployment is
Degraded PrefetchFailed. (Not run by the engineer who wrote it: no cluster in that session.)"""

from __future__ import annotations

import json

import pytest
from kube_helpers import apply, condition, get, items, wait_for
from operator_helpers import quickstart_into
from test_rollout import arm_class, arm_pods  # the quickstart's Raspberry Pi class, as the rollout tests read it

pytestmark = pytest.mark.cluster
PREFETCH = "edgefleet.io/prefetch"
ACTIVE = "edgefleet.io/active-digest"


def template(cluster, namespace) -> dict:
    (ds,) = [d for d in items(cluster, namespace, "daemonsets", "-l", "edgefleet.io/profile=cpu-arm64")]
    return ds["spec"]["template"]


@pytest.fixture
def prefetching(operator, cluster, namespace):
    """The quickstart on the Raspberry Pis, with prefetch (a short deadline) and waves."""
    docs = quickstart_into(cluster, namespace)
    ed = next(d for d in docs if d["kind"] == "EdgeDeployment")
    ed["spec"]["nodeSelector"] = {"matchLabels": {"edgefleet.io/device": "raspberry-pi-4"}}
    ed["spec"]["rollout"] = {"waves": [50, 100], "maxUnavailable": 1, "prefetch": {"deadlineSeconds": 20},
                             "healthGate": {"minReadySeconds": 2, "timeoutSeconds": 30}}
    apply(cluster, namespace, ed)

    def settled():
        pods, cls = arm_pods(cluster, namespace), arm_class(cluster, namespace)
        return cls.get("rollout") == "complete" and len(pods) == cls.get("desired") and pods and cls

    cls = wait_for(settled, timeout=180, what="first rollout complete")
    runtime = next(c for c in template(cluster, namespace)["spec"]["containers"] if c["name"] == "runtime")
    assert any(a.startswith("--control-dir=") for a in runtime["args"])
    return namespace, cls["digest"]


def test_prefetch_unreported_keeps_every_pod_and_template_and_activates_nothing(prefetching, cluster):
    namespace, old = prefetching
    pods = {p["metadata"]["name"]: p["metadata"]["uid"] for p in arm_pods(cluster, namespace)}
    before = template(cluster, namespace)
    cluster.kubectl("patch", "edgemodel", "digits", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"optimization": {"quantization": "fp16"}}}')

    def new_digest():
        em = get(cluster, namespace, "edgemodel", "digits")
        v = next((v for v in em["status"].get("variants", []) if v["profile"] == "cpu-arm64"), {})
        return v.get("precision") == "fp16" and v.get("state") == "Ready" and v["digest"]

    new = wait_for(new_digest, timeout=300, what="the fp16 variant compiled")
    cls = wait_for(lambda: (c := arm_class(cluster, namespace)).get("prefetch", {}).get("digest") == new and c,
                   timeout=60, what="status.classes[].prefetch for the new variant")
    assert cls["prefetch"]["done"] == 0 and cls["digest"] == old

    def ordered():
        found = arm_pods(cluster, namespace)
        return all(json.loads(p["metadata"].get("annotations", {}).get(PREFETCH, "{}")).get("digest") == new
                   for p in found) and found

    for p in wait_for(ordered, timeout=60, what="every pod told to prefetch"):
        assert ACTIVE not in p["metadata"].get("annotations", {})

    def failed():
        ed = get(cluster, namespace, "edgedeployment", "digits")
        degraded = condition(ed, "Degraded") or {}
        return degraded.get("reason") == "PrefetchFailed" and degraded

    degraded = wait_for(failed, timeout=90, what="Degraded PrefetchFailed after the deadline")
    assert "deadlineSeconds 20" in degraded["message"] and "Nothing is activated" in degraded["message"]
    after = {p["metadata"]["name"]: p["metadata"]["uid"] for p in arm_pods(cluster, namespace)}
    assert after == pods, "no pod was replaced"
    assert template(cluster, namespace) == before, "the pod template did not change"
    assert all(ACTIVE not in p["metadata"].get("annotations", {}) for p in arm_pods(cluster, namespace))
    progressing = condition(get(cluster, namespace, "edgedeployment", "digits"), "Progressing")
    assert progressing["status"] == "True"
