"""The operator against the real control plane and kwok fleet: the quickstart converges, and so do
relabelled nodes, new nodes, model changes and deletion."""

from __future__ import annotations

import re
import urllib.request
from collections import Counter

import pytest
import yaml
from kube_helpers import condition, get, items, wait_for
from operator_helpers import converged, placement, quickstart_into, untolerated, why_not

pytestmark = pytest.mark.cluster


def test_quickstart_serves_every_matching_node_with_its_class(operator, cluster, namespace):
    quickstart_into(cluster, namespace)
    served, variants, ed = wait_for(lambda: converged(cluster, namespace), timeout=180, what=why_not(namespace))
    want = placement(cluster)
    profiles = {p["metadata"]["name"]: p for p in items(cluster, None, "hardwareprofiles")}
    assert {"cpu-arm64", "cpu-amd64", "nvidia-jetson", "nvidia-gpu", "intel-openvino"} <= set(variants)
    for node, pod in served.items():
        spec = profiles[want[node]]["spec"]
        container = pod["spec"]["containers"][0]
        assert container["image"] == spec["runtimeImage"]
        limits = container["resources"].get("limits", {})
        assert limits.get("nvidia.com/gpu") == spec.get("extendedResources", {}).get("nvidia.com/gpu")
        assert {t["key"] for t in pod["spec"].get("tolerations", [])} >= {
            t["key"] for t in spec.get("tolerations", [])}
        assert container["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    gpu_nodes = {n for n, p in want.items() if p in ("nvidia-jetson", "nvidia-gpu")}
    assert gpu_nodes <= set(served)
    assert all(served[n]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1" for n in gpu_nodes)
    unmatched = [n for n, p in want.items() if p is None]
    assert unmatched and not set(unmatched) & set(served)
    assert ed["status"]["unmatchedNodes"] == len(unmatched)
    # coral needs a .tflite variant that only the compile Job can convert: reported, not hidden
    degraded = condition(ed, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "VariantMissing"
    assert "coral-edgetpu" in degraded["message"]
    events = items(cluster, namespace, "events", "--field-selector", "involvedObject.kind=EdgeDeployment")
    assert any(e["reason"] == "NodesWithoutProfile" for e in events)
    assert get(cluster, namespace, "service", "digits")["spec"]["selector"]["edgefleet.io/deployment"] == "digits"
    per_class = Counter(p for p in want.values() if p)

    def profile_counts():
        found = {p["metadata"]["name"]: p.get("status", {}).get("matchedNodes")
                 for p in items(cluster, None, "hardwareprofiles")}
        return found == {name: per_class.get(name, 0) for name in found} and found

    wait_for(profile_counts, timeout=60, what="HardwareProfile status.matchedNodes = nodes of each class")
    metrics = urllib.request.urlopen(operator.metrics_url, timeout=5).read().decode()
    ok = re.search(r'edgefleet_reconcile_total\{kind="EdgeDeployment",result="ok"\} (\d+)', metrics)
    assert ok and float(ok.group(1)) >= 1
    assert re.search(r"^edgefleet_fleet_nodes \d+", metrics, re.M)


def served_class(cluster, namespace, node) -> str | None:
    """The class of the pod serving `node` once the fleet has converged, else None."""
    state = converged(cluster, namespace)
    pod = state[0].get(node) if state else None
    return pod["metadata"]["labels"]["edgefleet.io/profile"] if pod else None


def test_relabelled_node_moves_to_its_new_class(operator, cluster, namespace):
    quickstart_into(cluster, namespace)
    wait_for(lambda: converged(cluster, namespace), timeout=180, what=why_not(namespace))
    node, label = "plain-amd64-0", "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI"
    cluster.kubectl("label", "--overwrite", "node", node, f"{label}=true")
    try:
        wait_for(lambda: served_class(cluster, namespace, node) == "intel-openvino", timeout=120,
                 what=why_not(namespace, "pod moved to intel-openvino"))
        # no tolerated cpu-amd64 node is left: its DaemonSet is removed, or (where an untolerated one is left, such
        # as the tainted real node of a CPU without AVX512-VNNI) it has no pods
        left = [n for n, p in placement(cluster).items() if p == "cpu-amd64"]
        daemonsets = items(cluster, namespace, "daemonsets", "-l", "edgefleet.io/profile=cpu-amd64")
        assert set(left) <= untolerated(cluster, placement(cluster))
        assert not daemonsets if not left else daemonsets[0]["status"]["desiredNumberScheduled"] == 0
    finally:
        cluster.kubectl("label", "node", node, f"{label}-")
    wait_for(lambda: served_class(cluster, namespace, node) == "cpu-amd64", timeout=120,
             what=why_not(namespace, "pod back on cpu-amd64"))


def test_new_node_joins_and_is_served(operator, cluster, namespace):
    quickstart_into(cluster, namespace)
    _, _, ed = wait_for(lambda: converged(cluster, namespace), timeout=180, what=why_not(namespace))
    before, matched = _class_counts(ed), _matched(cluster, "cpu-arm64")
    node = get(cluster, None, "node", "rpi4-0")
    new = {"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": f"rpi4-{namespace}", "labels": {**node["metadata"]["labels"],
                                                                 "kubernetes.io/hostname": f"rpi4-{namespace}"},
                        "annotations": {"kwok.x-k8s.io/node": "fake"}},
           "spec": {"taints": node["spec"].get("taints", [])},
           "status": {k: node["status"][k] for k in ("capacity", "allocatable", "nodeInfo")}}
    cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(new))
    try:
        served, _, _ = wait_for(lambda: (r := converged(cluster, namespace)) and new["metadata"]["name"] in r[0] and r,
                                timeout=120, what="the new node served")
        assert served[new["metadata"]["name"]]["metadata"]["labels"]["edgefleet.io/profile"] == "cpu-arm64"
        wait_for(lambda: _matched(cluster, "cpu-arm64") == matched + 1, timeout=30, what="cpu-arm64 matches one more")
    finally:
        cluster.kubectl("delete", "node", new["metadata"]["name"], "--wait=false")
    # the node's pod goes only when the pod garbage collector gets to it (40 s after the node): the class's
    # counts and the profile's matched nodes must drop before that
    wait_for(lambda: _class_counts(get(cluster, namespace, "edgedeployment", "digits")) == before, timeout=60,
             what=lambda: f"class counts back to {before}, are "
                          f"{_class_counts(get(cluster, namespace, 'edgedeployment', 'digits'))}")
    wait_for(lambda: _matched(cluster, "cpu-arm64") == matched, timeout=30, what="cpu-arm64 matchedNodes back")


def _matched(cluster, profile: str) -> int | None:
    return get(cluster, None, "hardwareprofile", profile).get("status", {}).get("matchedNodes")


def _class_counts(ed: dict) -> dict[str, tuple[int, int]]:
    return {c["profile"]: (c["desired"], c["ready"]) for c in ed.get("status", {}).get("classes", [])}


def test_model_change_recompiles_and_rolls_out(operator, cluster, namespace):
    quickstart_into(cluster, namespace)
    _, before, _ = wait_for(lambda: converged(cluster, namespace), timeout=180, what=why_not(namespace))
    cluster.kubectl("patch", "edgemodel", "digits", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"optimization": {"quantization": "none"}}}')

    def rolled_out():  # `auto` picks int8 (cpu) and fp16 (GPU) on an idle host; fp32 can win under load
        r = converged(cluster, namespace)
        changed = r and {p for p, v in r[1].items() if v["digest"] != before.get(p, {}).get("digest")}
        return r and changed and r[1].get("cpu-arm64", {}).get("precision") == "fp32" and r

    _, after, ed = wait_for(rolled_out, timeout=180, what="fp32 variants rolled out")
    assert before["cpu-arm64"]["precision"] == "fp32" or after["cpu-arm64"]["digest"] != before["cpu-arm64"]["digest"]
    digests = {c["profile"]: c["digest"] for c in ed["status"]["classes"]}
    assert digests["cpu-arm64"] == after["cpu-arm64"]["digest"]


def test_deleting_the_deployment_removes_everything_it_made(operator, cluster, namespace):
    quickstart_into(cluster, namespace)
    wait_for(lambda: converged(cluster, namespace), timeout=180, what=why_not(namespace))
    assert items(cluster, namespace, "daemonsets", "-l", "edgefleet.io/deployment=digits")
    cluster.kubectl("delete", "edgedeployment", "digits", "-n", namespace)
    wait_for(lambda: not items(cluster, namespace, "daemonsets,services,pods", "-l", "edgefleet.io/deployment=digits"),
             timeout=90, what="children garbage-collected")
