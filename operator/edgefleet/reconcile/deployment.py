"""EdgeDeployment: one workload per hardware class that has matching nodes and a ready variant."""

from __future__ import annotations

import logging
import time
from collections import Counter

from ..api import EdgeDeployment, EdgeModel, Variant, label_selector_matches
from ..kube import Kube
from ..render import child_labels, child_name, render_class, render_service, resolve_nodes, split_replicas, waves_of
from ..settings import Settings
from .conditions import flipped, set_condition, without_times
from .rollout import Decision, decide
from .world import World

log = logging.getLogger(__name__)
WORKLOAD_KINDS = ("DaemonSet", "Deployment")


def _ready_variants(model: dict | None) -> dict[str, Variant]:
    if model is None:
        return {}
    em = EdgeModel.model_validate(model)
    variants = em.status.variants if em.status else []
    return {v.profile: v for v in variants or [] if v.state == "Ready" and v.digest and v.artifact}


def _class_counts(obj: dict) -> tuple[int, int, int]:
    st = obj.get("status", {})
    if obj["kind"] == "DaemonSet":
        return st.get("desiredNumberScheduled", 0), st.get("numberReady", 0), st.get("updatedNumberScheduled", 0)
    return obj["spec"].get("replicas", 0), st.get("readyReplicas", 0), st.get("updatedReplicas", 0)


def _observed(obj: dict) -> bool:
    return obj.get("status", {}).get("observedGeneration", 0) >= obj["metadata"].get("generation", 0)


def reconcile_deployment(kube: Kube, settings: Settings, namespace: str, name: str,
                         world: World | None = None) -> float | None:
    """Converge one EdgeDeployment; returns seconds until it wants another look (a rollout in waves)."""
    raw = kube.find("EdgeDeployment", name, namespace)
    if raw is None or raw["metadata"].get("deletionTimestamp"):
        return None  # owner references let the garbage collector remove what we made
    ed = EdgeDeployment.model_validate(raw)
    world = world or World.read(kube)
    model = kube.find("EdgeModel", ed.spec.model_ref.name, namespace)
    variants = _ready_variants(model)

    fleet = {n: labels for n, labels in world.nodes.items() if label_selector_matches(ed.spec.node_selector, labels)}
    placement = resolve_nodes(fleet, world.profiles)
    per_class = Counter(p for p in placement.values() if p)
    unmatched = sum(1 for p in placement.values() if p is None)
    profiles = {p.metadata["name"]: p for p in world.profiles}
    replicas = split_replicas(ed.spec.replicas or 0, dict(per_class)) if ed.spec.mode == "Replicas" else {}

    children = {(kind, o["metadata"]["name"]): {**o, "kind": kind}  # list items carry no kind
                for kind in WORKLOAD_KINDS for o in kube.list(kind, namespace, child_labels(name))}
    kind = "DaemonSet" if ed.spec.mode == "PerNode" else "Deployment"
    applied, missing, rollouts = {}, [], {}
    for profile_name in sorted(per_class):
        variant = variants.get(profile_name)
        existing = children.get((kind, child_name(name, profile_name)))
        if variant is None:
            missing.append(profile_name)
            if existing is not None:  # recompiling or failed: keep serving what the nodes have
                applied[profile_name] = existing
            continue
        manifest = render_class(ed, profiles[profile_name], variant, world.profiles, settings.node_cache,
                                replicas.get(profile_name), settings.artifact_insecure)
        decision = _decide(kube, ed, manifest, existing) if waves_of(ed) else None
        if decision is not None:
            rollouts[profile_name] = decision
            manifest = decision.manifest
        applied[profile_name] = kube.apply(manifest)
        for pod in decision.delete if decision else ():
            log.info("rollout %s/%s %s: replacing pod %s", namespace, name, profile_name, pod)
            kube.delete("Pod", pod, namespace)
    _apply_service(kube, ed, namespace)
    _prune(kube, namespace, children, {(o["kind"], o["metadata"]["name"]) for o in applied.values()})
    _write_status(kube, raw, ed, applied, variants, missing, unmatched, model is not None, rollouts)
    waits = [d.requeue for d in rollouts.values() if d.requeue]
    return min(waits) if waits else None


def _decide(kube: Kube, ed: EdgeDeployment, manifest: dict, existing: dict | None) -> Decision:
    meta = manifest["metadata"]
    pods = kube.list("Pod", meta["namespace"], manifest["spec"]["selector"]["matchLabels"]) if existing else []
    rollout = ed.spec.rollout
    return decide(manifest, existing, pods, waves_of(ed), rollout.max_unavailable,
                  rollout.health_gate.min_ready_seconds, rollout.health_gate.timeout_seconds,
                  rollout.auto_rollback, time.time())


def _apply_service(kube: Kube, ed: EdgeDeployment, namespace: str) -> None:
    if ed.spec.service.enabled:
        kube.apply(render_service(ed))
    else:
        kube.delete("Service", ed.metadata["name"], namespace)


def _prune(kube: Kube, namespace: str, children: dict, keep: set[tuple[str, str]]) -> None:
    """Delete workloads of classes that no longer have nodes (or a variant, or the mode changed)."""
    for kind, child in children:
        if (kind, child) not in keep:
            log.info("deleting %s %s/%s: its class has no nodes or variant now", kind, namespace, child)
            kube.delete(kind, child, namespace)


def _served_digest(obj: dict) -> str | None:
    return obj["spec"]["template"]["metadata"].get("annotations", {}).get("edgefleet.io/variant-digest")


def _write_status(kube, raw, ed, applied, variants, missing, unmatched, model_found, rollouts) -> None:
    generation = raw["metadata"].get("generation")
    old = raw.get("status") or {}
    classes = []
    for profile_name, obj in sorted(applied.items()):
        desired, ready, updated = _class_counts(obj) if _observed(obj) else (0, 0, 0)
        entry = {"profile": profile_name, "desired": desired, "ready": ready, "updated": updated,
                 "digest": _served_digest(obj)}
        if profile_name in rollouts:
            entry["rollout"] = rollouts[profile_name].progress
        classes.append(entry)
    desired = sum(c["desired"] for c in classes)
    ready = sum(c["ready"] for c in classes)
    settled = all(_observed(o) for o in applied.values())
    complete = settled and all(c["ready"] == c["desired"] == c["updated"] for c in classes)
    conds = old.get("conditions", [])
    conds = set_condition(conds, "Available", bool(classes) and complete and desired > 0,
                          "AllClassesReady" if complete and classes else "ClassesNotReady",
                          f"{ready}/{desired} pods ready across {len(classes)} hardware classes", generation)
    conds = set_condition(conds, "Progressing", not complete,
                          "RollingOut" if not complete else "RolloutComplete",
                          "waiting for pods to be updated and ready" if not complete else "every class is up to date",
                          generation)
    problem = _degraded(ed, missing, model_found, rollouts)
    conds = set_condition(conds, "Degraded", problem is not None, problem[0] if problem else "AsExpected",
                          problem[1] if problem else "every matching node has a variant to serve", generation)
    status = {"observedGeneration": generation, "conditions": conds, "classes": classes,
              "unmatchedNodes": unmatched, "nodesReady": f"{ready}/{desired}"}
    if unmatched and unmatched != old.get("unmatchedNodes", 0):
        kube.event(raw, "NodesWithoutProfile",
                   f"{unmatched} nodes match spec.nodeSelector but no HardwareProfile; they run nothing", "Warning")
    if _same(old, status):
        return
    kube.patch_status("EdgeDeployment", ed.metadata["name"], ed.metadata["namespace"], status)
    for c in flipped(old.get("conditions", []), conds):
        if c["type"] in ("Available", "Degraded") and (c["type"] == "Available" or c["status"] == "True"):
            kube.event(raw, c["reason"], c["message"], "Warning" if c["type"] == "Degraded" else "Normal")


def _degraded(ed: EdgeDeployment, missing: list[str], model_found: bool, rollouts: dict) -> tuple[str, str] | None:
    back = {p: d.rolled_back for p, d in rollouts.items() if d.rolled_back}
    paused = {p: d.failed for p, d in rollouts.items() if d.failed}
    if back:
        return "RolledBack", "; ".join(f"{p}: {why}" for p, why in sorted(back.items()))
    if paused:
        return "RolloutFailed", "; ".join(f"{p}: {why}" for p, why in sorted(paused.items()))
    if not model_found:
        return "ModelNotFound", f"EdgeModel {ed.spec.model_ref.name!r} does not exist in this namespace"
    if missing:
        return "VariantMissing", ("no Ready variant yet for hardware classes " + ", ".join(missing)
                                  + "; see the EdgeModel's status.variants")
    return None


def _same(old: dict, new: dict) -> bool:
    keys = ("observedGeneration", "classes", "unmatchedNodes", "nodesReady")
    return all(old.get(k) == new.get(k) for k in keys) and without_times(old.get("conditions", [])) == without_times(
        new["conditions"])
