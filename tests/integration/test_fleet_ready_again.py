"""The simulated fleet survives a control-plane blip: a kwok pod that lost Ready (as the node lifecycle controller
marks the pods of a node it could not hear from) is Ready again, as a real kubelet would re-report it."""

from __future__ import annotations

import json

import pytest
from kube_helpers import apply, get, wait_for

pytestmark = pytest.mark.cluster


def _ready(pod: dict) -> str:
    return next((c["status"] for c in pod.get("status", {}).get("conditions", []) if c["type"] == "Ready"), "")


def test_a_kwok_pod_marked_not_ready_is_ready_again(cluster, namespace):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "blip", "namespace": namespace},
           "spec": {"nodeSelector": {"edgefleet.io/device": "raspberry-pi-4"},
                    "tolerations": [{"key": "node-role.kubernetes.io/edge", "operator": "Exists"}],
                    "containers": [{"name": "app", "image": "registry.local/app:1"}]}}
    apply(cluster, namespace, pod)
    wait_for(lambda: _ready(get(cluster, namespace, "pod", "blip")) == "True", 60, what="the kwok pod Ready")
    not_ready = {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "NodeNotReady"},
                                           {"type": "ContainersReady", "status": "False"}]}}
    cluster.kubectl("patch", "pod", "blip", "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps(not_ready))
    wait_for(lambda: _ready(get(cluster, namespace, "pod", "blip")) == "True", 60,
             what="the kwok pod Ready again after it was marked NotReady")
    assert get(cluster, namespace, "pod", "blip")["status"]["phase"] == "Running"
