"""Operator test helpers: the quickstart in a namespace, and the check that the fleet has converged."""

from __future__ import annotations

from collections import Counter

import yaml
from edgefleet.api import HardwareProfile
from edgefleet.render import resolve_nodes
from kube_helpers import apply, get, is_ready, items

QUICKSTART = "examples/quickstart"


def quickstart_into(cluster, namespace: str) -> list[dict]:
    """The quickstart's objects, moved into `namespace` (the example itself uses edgefleet-demo)."""
    docs = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", QUICKSTART).stdout) if d]
    docs = [d for d in docs if d["kind"] != "Namespace"]
    for d in docs:
        d["metadata"]["namespace"] = namespace
    apply(cluster, namespace, docs)
    return docs


def placement(cluster) -> dict[str, str | None]:
    nodes = {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in items(cluster, None, "nodes")}
    profiles = [HardwareProfile.model_validate(p) for p in items(cluster, None, "hardwareprofiles")]
    return resolve_nodes(nodes, profiles)


def untolerated(cluster, want: dict[str, str | None]) -> set[str]:
    """Nodes of a class whose pods cannot land there: a NoSchedule/NoExecute taint the class's profile does not
    tolerate (e.g. the dev cluster's real node, edgefleet.io/real-node). A DaemonSet puts no pod on them."""
    nodes = {n["metadata"]["name"]: n.get("spec", {}).get("taints", []) for n in items(cluster, None, "nodes")}
    tolerations = {p["metadata"]["name"]: p["spec"].get("tolerations", [])
                   for p in items(cluster, None, "hardwareprofiles")}
    return {node for node, prof in want.items() if prof and any(
        t["effect"] in ("NoSchedule", "NoExecute") and not any(_tolerates(tol, t) for tol in tolerations.get(prof, []))
        for t in nodes.get(node, []))}


def _tolerates(tol: dict, taint: dict) -> bool:
    if tol.get("effect") and tol["effect"] != taint["effect"]:
        return False
    if tol.get("operator") == "Exists":
        return not tol.get("key") or tol["key"] == taint["key"]
    return tol.get("key") == taint["key"] and tol.get("value", "") == taint.get("value", "")


def ready_variants(cluster, namespace: str) -> dict[str, dict] | None:
    """Ready variants once the model's current generation is compiled, else None."""
    em = get(cluster, namespace, "edgemodel", "digits")
    status = em.get("status", {})
    variants = status.get("variants", [])
    if status.get("observedGeneration") != em["metadata"]["generation"] or not variants:
        return None
    if any(v.get("state") not in ("Ready", "Failed") for v in variants):
        return None
    return {v["profile"]: v for v in variants if v.get("state") == "Ready"}


def converged(cluster, namespace: str):
    """The served state when it equals the desired state, else None."""
    want = placement(cluster)
    variants = ready_variants(cluster, namespace)
    if not variants:
        return None
    pods = [p for p in items(cluster, namespace, "pods", "-l", "edgefleet.io/deployment=digits")
            if not p["metadata"].get("deletionTimestamp")]
    served = {p["spec"].get("nodeName"): p for p in pods}
    expected = {node for node, prof in want.items() if prof in variants} - untolerated(cluster, want)
    if len(pods) != len(served) or set(served) != expected or not all(is_ready(p) for p in pods):
        return None
    for node, pod in served.items():
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        if labels["edgefleet.io/profile"] != want[node]:
            return None
        if annotations["edgefleet.io/variant-digest"] != variants[want[node]]["digest"]:
            return None
    ed = get(cluster, namespace, "edgedeployment", "digits")
    status = ed.get("status", {})
    if status.get("observedGeneration") != ed["metadata"]["generation"]:
        return None
    counts = Counter(p["metadata"]["labels"]["edgefleet.io/profile"] for p in pods)
    classes = {c["profile"]: c for c in status.get("classes", [])}
    if {k: (c["desired"], c["ready"]) for k, c in classes.items()} != {k: (n, n) for k, n in counts.items()}:
        return None
    return served, variants, ed
