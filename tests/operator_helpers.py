"""Operator test helpers: the quickstart in a namespace, and the check that the fleet has converged."""

from __future__ import annotations

from collections import Counter

import yaml
from edgefleet.api import HardwareProfile
from edgefleet.render import resolve_nodes
from edgefleet_dev.admin import trust_with_privileged_classes
from kube_helpers import apply, get, is_ready, items

QUICKSTART = "examples/quickstart"


def quickstart_into(cluster, namespace: str) -> list[dict]:
    """The quickstart's objects, moved into `namespace` (the example itself uses edgefleet-demo). The fleet has
    Coral boxes: as their admin would, the test first trusts `namespace` with the privileged classes
    (spec.allowedNamespaces), else coral-edgetpu refuses it (ClassNotAllowed) and the quickstart never settles."""
    trust_with_privileged_classes(cluster, namespace)
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


WHY_NOT: dict[str, str] = {}  # namespace -> why the last `converged` look said no, for timeout messages


def converged(cluster, namespace: str):
    """The served state when it equals the desired state, else None (the reason in WHY_NOT[namespace])."""
    state = _convergence(cluster, namespace)
    if isinstance(state, str):
        WHY_NOT[namespace] = state
        return None
    return state


def why_not(namespace: str, about: str = "quickstart converged"):
    """A `what` for wait_for: names the last reason `converged` gave for `namespace`."""
    return lambda: f"{about} ({WHY_NOT.get(namespace, 'never looked')})"


def _convergence(cluster, namespace: str):
    want = placement(cluster)
    variants = ready_variants(cluster, namespace)
    if not variants:
        em = get(cluster, namespace, "edgemodel", "digits")
        return f"no ready variants yet: EdgeModel status {em.get('status', {})}"
    pods = [p for p in items(cluster, namespace, "pods", "-l", "edgefleet.io/deployment=digits")
            if not p["metadata"].get("deletionTimestamp")]
    served = {p["spec"].get("nodeName"): p for p in pods}
    expected = {node for node, prof in want.items() if prof in variants} - untolerated(cluster, want)
    if len(pods) != len(served) or set(served) != expected:
        return f"pods on {sorted(map(str, served))} ({len(pods)} pods), want one on each of {sorted(expected)}"
    unready = [p["metadata"]["name"] for p in pods if not is_ready(p)]
    if unready:
        return f"pods not Ready: {unready}"
    for node, pod in served.items():
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        if labels["edgefleet.io/profile"] != want[node]:
            return f"pod {pod['metadata']['name']} on {node} is {labels['edgefleet.io/profile']}, want {want[node]}"
        if annotations["edgefleet.io/variant-digest"] != variants[want[node]]["digest"]:
            return f"pod {pod['metadata']['name']} on {node} serves an older variant"
    ed = get(cluster, namespace, "edgedeployment", "digits")
    status = ed.get("status", {})
    if status.get("observedGeneration") != ed["metadata"]["generation"]:
        return f"EdgeDeployment observedGeneration {status.get('observedGeneration')} != {ed['metadata']['generation']}"
    counts = Counter(p["metadata"]["labels"]["edgefleet.io/profile"] for p in pods)
    # a class whose nodes all have taints the deployment does not tolerate keeps a workload with no pods (0, 0)
    classes = {c["profile"]: (c["desired"], c["ready"]) for c in status.get("classes", [])
               if c["profile"] in counts or (c["desired"], c["ready"]) != (0, 0)}
    if classes != {k: (n, n) for k, n in counts.items()}:
        return f"EdgeDeployment classes (desired, ready) {classes}, pods per class {dict(counts)}"
    return served, variants, ed
