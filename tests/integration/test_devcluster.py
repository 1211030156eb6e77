"""The local control plane behaves like a real cluster: scheduling on labels, taints and extended
resources, controllers, garbage collection, and the OCI registry."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from kube_helpers import apply, get, is_ready, wait_for

pytestmark = pytest.mark.cluster

EDGE_TOLERATION = {"key": "node-role.kubernetes.io/edge", "operator": "Exists", "effect": "NoSchedule"}


def pod_template(labels, **spec):
    return {
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "c", "image": "registry.example/app:1"}], **spec},
    }


def nodes_with(cluster, label, value):
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return {n["metadata"]["name"] for n in nodes if n["metadata"]["labels"].get(label) == value}


def test_nodes_are_ready_with_labels_and_capacity(cluster):
    ready, total = cluster.nodes_ready()
    assert total >= 8 and ready == total
    jetson = json.loads(cluster.kubectl("get", "node", "jetson-orin-nano-0", "-o", "json").stdout)
    assert jetson["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert jetson["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-Jetson-Orin-Nano"


def test_arm64_daemonset_runs_on_exactly_the_arm64_nodes(cluster, namespace):
    labels = {"app": "arm-only"}
    apply(cluster, namespace, {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "arm-only"},
        "spec": {"selector": {"matchLabels": labels},
                 "template": pod_template(labels, nodeSelector={"kubernetes.io/arch": "arm64"},
                                          tolerations=[EDGE_TOLERATION])},
    })
    arm = nodes_with(cluster, "kubernetes.io/arch", "arm64")
    assert len(arm) >= 3

    def ready_nodes():
        pods = get(cluster, namespace, "pods", "-l", "app=arm-only")["items"]
        ready = {p["spec"].get("nodeName") for p in pods if is_ready(p)}
        return ready if ready == arm and len(pods) == len(arm) else None

    wait_for(ready_nodes, what="one Ready pod per arm64 node")


def _gpu_requests_elsewhere(cluster, namespace):
    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    return sum(
        int(c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu", 0))
        for p in pods if p["metadata"]["namespace"] != namespace and p["spec"].get("nodeName")
        and p["status"].get("phase") not in ("Succeeded", "Failed")
        for c in p["spec"]["containers"]
    )


def test_gpu_pods_land_only_on_gpu_nodes_and_wait_when_gpus_run_out(cluster, namespace):
    wait_for(lambda: _gpu_requests_elsewhere(cluster, namespace) == 0, timeout=90, what="GPUs free of other tests")
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    gpus = {n["metadata"]["name"]: int(n["status"]["allocatable"].get("nvidia.com/gpu", 0)) for n in nodes}
    total = sum(gpus.values())
    assert total >= 2
    labels = {"app": "gpu"}
    template = pod_template(labels, tolerations=[EDGE_TOLERATION])
    template["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    apply(cluster, namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "gpu"},
        "spec": {"replicas": total + 1, "selector": {"matchLabels": labels}, "template": template},
    })

    def settled():
        pods = get(cluster, namespace, "pods", "-l", "app=gpu")["items"]
        running = [p for p in pods if is_ready(p)]
        pending = [p for p in pods if p["status"].get("phase") == "Pending" and not p["spec"].get("nodeName")]
        return (running, pending) if len(running) == total and len(pending) == 1 else None

    running, pending = wait_for(settled, what=f"{total} GPU pods Running and one Pending")
    assert all(gpus[p["spec"]["nodeName"]] > 0 for p in running)
    per_node = {}
    for p in running:
        per_node[p["spec"]["nodeName"]] = per_node.get(p["spec"]["nodeName"], 0) + 1
    assert all(count <= gpus[node] for node, count in per_node.items())
    unschedulable = [c for c in pending[0]["status"].get("conditions", []) if c["type"] == "PodScheduled"]
    assert unschedulable and "nvidia.com/gpu" in unschedulable[0]["message"]


def test_pod_without_edge_toleration_never_lands_on_an_edge_node(cluster, namespace):
    pod = pod_template({}, nodeSelector={"node-role.kubernetes.io/edge": ""})
    pod["metadata"]["name"] = "no-toleration"
    apply(cluster, namespace, {"apiVersion": "v1", "kind": "Pod", **pod})

    def reason():
        pod = get(cluster, namespace, "pod", "no-toleration")
        conds = [c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled"]
        return conds[0] if conds and conds[0]["status"] == "False" else None

    cond = wait_for(reason, what="the pod to be reported unschedulable")
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    tainted = [n for n in nodes if any(t["effect"] == "NoSchedule" for t in n["spec"].get("taints", []))]
    edge_nodes = nodes_with(cluster, "node-role.kubernetes.io/edge", "")
    assert edge_nodes <= {n["metadata"]["name"] for n in tainted}  # the edge taint (and the real node's)
    assert f"{len(tainted)} node(s) had untolerated taint" in cond["message"]
    time.sleep(2)
    assert not get(cluster, namespace, "pod", "no-toleration")["spec"].get("nodeName")


def test_job_completes(cluster, namespace):
    apply(cluster, namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": pod_template({}, restartPolicy="Never")},
    })
    wait_for(lambda: get(cluster, namespace, "job", "once")["status"].get("succeeded") == 1, what="Job success")


def test_deleting_an_owner_garbage_collects_its_children(cluster, namespace):
    labels = {"app": "gc"}
    apply(cluster, namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "gc"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": pod_template(labels, nodeSelector={"kubernetes.io/arch": "amd64"},
                                          tolerations=[EDGE_TOLERATION])},
    })
    wait_for(lambda: len([p for p in get(cluster, namespace, "pods", "-l", "app=gc")["items"] if is_ready(p)]) == 2,
             what="two Ready pods")
    assert get(cluster, namespace, "replicasets", "-l", "app=gc")["items"]
    cluster.kubectl("delete", "-n", namespace, "deployment", "gc", "--wait=false")
    wait_for(lambda: not get(cluster, namespace, "replicasets", "-l", "app=gc")["items"]
             and not get(cluster, namespace, "pods", "-l", "app=gc")["items"], what="children collected")


def test_oras_round_trip_is_byte_identical(cluster, tmp_path):
    import oras.client

    payload = tmp_path / "model.bin"
    payload.write_bytes(bytes(range(256)) * 4096)
    target = f"{cluster.registry}/edgefleet-test/blob:v1"
    client = oras.client.OrasClient(insecure=True)
    client.push(files=[str(payload)], target=target, disable_path_validation=True)
    out = tmp_path / "pulled"
    files = client.pull(target=target, outdir=str(out))
    assert len(files) == 1
    assert open(files[0], "rb").read() == payload.read_bytes()


def test_second_up_reuses_the_running_cluster(cluster):
    name = cluster.state.name
    proc = subprocess.run([sys.executable, "-m", "edgefleet.cli", "cluster", "up", "--name", name],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "already running" in proc.stderr


def test_status_reports_components_and_nodes(cluster):
    proc = subprocess.run([sys.executable, "-m", "edgefleet.cli", "cluster", "status", "--name", cluster.state.name,
                           "--json"], capture_output=True, text=True, timeout=60)
    st = json.loads(proc.stdout)
    assert st["running"] and st["nodes"]["ready"] == st["nodes"]["total"] > 0
    assert st["components"]["kube-apiserver"]["version"] == "v1.36.3"
    assert set(st["components"]) >= {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
                                     "registry"}
