"""Errors reach the user on the real control plane: two EdgeDeployments want the same GPUs, and the one
that cannot get them says why in its status (the scheduler's reason), turns Degraded and posts one event."""

from __future__ import annotations

import time

import pytest
import yaml
from edgefleet.reconcile.deployment import RECHECK_SECONDS
from kube_helpers import apply, condition, get, items, wait_for
from operator_helpers import QUICKSTART

pytestmark = pytest.mark.cluster
JETSONS = {"matchLabels": {"edgefleet.io/device": "jetson-orin-nano"}}  # kwok nodes with one GPU each


def edge_deployment(name: str) -> dict:
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment", "metadata": {"name": name},
            "spec": {"modelRef": {"name": "gpu-model"}, "nodeSelector": JETSONS}}


def jetson_class(cluster, namespace: str, name: str) -> dict:
    ed = get(cluster, namespace, "edgedeployment", name)
    return next((c for c in ed.get("status", {}).get("classes", []) if c["profile"] == "nvidia-jetson"), {})


def test_second_deployment_wanting_the_same_gpus_says_why_its_pods_are_pending(operator, cluster, namespace):
    docs = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", QUICKSTART).stdout) if d]
    model_cm = next(d for d in docs if d["kind"] == "ConfigMap")
    model_cm["metadata"]["namespace"] = namespace
    model = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": "gpu-model"},
             "spec": {"source": {"configMap": {"name": model_cm["metadata"]["name"], "key": "digits_cnn.onnx"}},
                      "format": "onnx", "optimization": {"quantization": "none"},
                      "targetProfiles": {"names": ["nvidia-jetson"]}}}
    apply(cluster, namespace, [model_cm, model, edge_deployment("first")])

    def first_holds_the_gpus():
        cls = jetson_class(cluster, namespace, "first")
        return cls.get("desired", 0) > 0 and (cls["ready"] == cls["desired"] or "message" in cls) and cls

    wait_for(first_holds_the_gpus, timeout=180, what="the first EdgeDeployment's GPU pods scheduled")
    apply(cluster, namespace, edge_deployment("second"))

    def second_degraded():
        ed = get(cluster, namespace, "edgedeployment", "second")
        degraded = condition(ed, "Degraded") or {}
        return degraded.get("reason") == "PodsUnschedulable" and ed

    ed = wait_for(second_degraded, timeout=150, every=2, what="the second EdgeDeployment Degraded: PodsUnschedulable")
    cls = jetson_class(cluster, namespace, "second")
    assert "pods Pending: Insufficient nvidia.com/gpu" in cls["message"], cls
    degraded = condition(ed, "Degraded")
    assert degraded["status"] == "True"
    assert "nvidia-jetson: " in degraded["message"] and "Fix: " in degraded["message"]
    assert "Insufficient nvidia.com/gpu" in condition(ed, "Progressing")["message"]
    time.sleep(RECHECK_SECONDS + 5)  # the operator looks again while a class is behind ...
    assert "Insufficient nvidia.com/gpu" in jetson_class(cluster, namespace, "second")["message"]

    def warnings():
        return [e for e in items(cluster, namespace, "events", "--field-selector",
                                 "involvedObject.kind=EdgeDeployment,involvedObject.name=second")
                if e["type"] == "Warning" and e["reason"] == "PodsUnschedulable"]

    found = wait_for(warnings, timeout=20, what="a PodsUnschedulable Warning event")
    assert len(found) == 1, found  # ... but posts the event once, on the transition
