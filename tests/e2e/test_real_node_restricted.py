"""Tenant-safe runtime pods on the dev cluster's real node: the quickstart's class served in a namespace that
enforces Pod Security `restricted`, its node cache a CSI ephemeral volume of the chart's driver
(cache.edgefleet.io, nodeCache.enabled) under the real kubelet; a pod of another namespace sees none of it.

The chart's operator runs on the real node watching this module's two namespaces; the driver's DaemonSet is
privileged, so the release namespace enforces `privileged` here (its own namespace in a production install).
Traffic goes only to the pods this module creates; every wait is bounded."""

from __future__ import annotations

import json
import uuid

import pytest
from kube_helpers import get, wait_for
from operator_helpers import quickstart_into
from real_node_helpers import (
    TOLERATION,
    chart_values,
    eval_set,
    install_operator,
    real_node_class,
    real_pods,
    score,
    serving_pod,
    tolerating_real_node,
    uninstall_operator,
)

pytestmark = pytest.mark.cluster
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


@pytest.fixture(scope="module")
def tenants(cluster):
    names = [f"rn-tenant-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for name in names:
        cluster.kubectl("create", "namespace", name)
        cluster.kubectl("label", "namespace", name, RESTRICTED)
    yield names
    for name in names:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def csi_operator(cluster, real_node, tenants, tmp_path_factory):
    values = {**chart_values(cluster, real_node, repository=f"edgefleet-e2e/{tenants[0]}"),
              "watchNamespaces": tenants,
              "nodeCache": {"enabled": True, "hostPath": cluster.real_node["nodeCache"],
                            "kubeletDir": str(cluster.state / "node" / "kubelet"), "tolerations": [TOLERATION]}}
    install_operator(cluster, values, tmp_path_factory.mktemp("chart"), pod_security="privileged")
    yield
    uninstall_operator(cluster)


def _served(cluster, namespace: str, profile: str) -> dict:
    variant = wait_for(lambda: next((v for v in get(cluster, namespace, "edgemodel", "digits").get("status", {})
                                     .get("variants", []) if v["profile"] == profile and v["state"] == "Ready"),
                                    None), 420, 2, f"the {profile} variant in {namespace}")
    return wait_for(lambda: serving_pod(cluster, namespace, profile, variant["digest"]), 240, 1,
                    lambda: f"a Ready {profile} pod in {namespace}\n" + cluster.kubectl(
                        "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout[-3000:])


def _listing(cluster, namespace: str) -> list[str]:
    """Every file a pod of `namespace` sees in its node cache volume (the driver's folder `models`)."""
    image = get(cluster, None, "hardwareprofile", real_node_class(cluster))["spec"]["runtimeImage"]
    name = f"look-{uuid.uuid4().hex[:6]}"
    script = "import os,json;print(json.dumps([os.path.join(d,f) for d,_,fs in os.walk('/cache') for f in fs]))"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
           "spec": {"nodeName": cluster.real_node["name"], "restartPolicy": "Never",
                    "automountServiceAccountToken": False, "tolerations": [TOLERATION],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{"name": "look", "image": image, "command": ["/usr/bin/python3.11", "-c", script],
                                    "securityContext": {"allowPrivilegeEscalation": False,
                                                        "capabilities": {"drop": ["ALL"]}},
                                    "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}],
                    "volumes": [{"name": "cache", "csi": {"driver": "cache.edgefleet.io",
                                                          "volumeAttributes": {"folder": "models"}}}]}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    phase = wait_for(lambda: (p := get(cluster, namespace, "pod", name).get("status", {}).get("phase")) in (
        "Succeeded", "Failed") and p, 120, 1, f"pod {namespace}/{name} to finish")
    log = cluster.kubectl("logs", "-n", namespace, name, check=False).stdout
    assert phase == "Succeeded", log[-2000:]
    return json.loads(log.strip().splitlines()[-1])


def test_tenant_quickstart_serves_on_the_real_node_under_restricted_pod_security_and_another_namespace_sees_none_of_its_cache(  # noqa: E501
        cluster, csi_operator, tenants):
    first, second = tenants
    profile = real_node_class(cluster)
    with tolerating_real_node(cluster, profile):
        quickstart_into(cluster, first)
        patch = {"spec": {"nodeSelector": {"matchLabels": {TOLERATION["key"]: "true"}}}}
        cluster.kubectl("patch", "edgedeployment", "digits", "-n", first, "--type=merge", "-p", json.dumps(patch))
        pod = _served(cluster, first, profile)
        spec = pod["spec"]
        assert not any("hostPath" in v for v in spec["volumes"]), spec["volumes"]
        assert any(v.get("csi", {}).get("driver") == "cache.edgefleet.io" for v in spec["volumes"])
        tally = score(pod["status"]["podIP"], 8080, *eval_set(100))
        assert tally.failed == 0 and tally.top1 > 0.9, (tally.failures[:3], tally.top1)
        digest = pod["metadata"]["annotations"]["edgefleet.io/variant-digest"].split(":")[1]
        mine, theirs = _listing(cluster, first), _listing(cluster, second)
        assert any(digest in path for path in mine), mine  # the check can see a variant where there is one
        assert not any(digest in path for path in theirs), theirs
        assert real_pods(cluster, first, profile)
