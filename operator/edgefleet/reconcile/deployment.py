"""EdgeDeployment: one workload per hardware class that has matching nodes and a ready variant."""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..api import ConfigMapKeyRef, EdgeDeployment, EdgeModel, HardwareProfile, Variant, label_selector_matches
from ..kube import ApiError, Kube
from ..render import child_labels, child_name, render_class, render_service, resolve_nodes, split_replicas, waves_of
from ..render.bench_job import gate_verdict
from ..render.placement import PlacementError
from ..render.tenancy import class_refusal
from ..render.workload import controlled, model_transform
from ..settings import Settings
from .applied import apply_changed
from .conditions import (
    AVAILABLE,
    DEGRADED,
    DRIFTING,
    PROGRESSING,
    flipped,
    set_condition,
    status_patch,
    without_times,
)
from .drift import THROTTLE, missing_evaluation, read_pods, scrape, verdict
from .errors import PermanentError, as_permanent, report_invalid_spec
from .pipeline_health import READ_INTERVAL_SECONDS as PIPELINE_READ_SECONDS
from .pipeline_health import THROTTLE as PIPELINE_THROTTLE
from .pipeline_health import problem as pipeline_unreachable
from .pipeline_health import read_pods as read_pipelines
from .pods import ClassHealth, class_health
from .rollout import Decision, decide
from .updates import ControlledDecision, apply_patches, controlled_class, plain_deltas, with_record
from .world import World

Children = dict[tuple[str, str], dict[str, Any]]  # (kind, name) -> a workload the EdgeDeployment owns
log = logging.getLogger(__name__)
WORKLOAD_KINDS = ("DaemonSet", "Deployment")
RECHECK_SECONDS = 15.0  # while a class is not ready: pod problems change no workload, so look again
PROFILE_LABEL = "edgefleet.io/profile"


def _ready_variants(model: dict[str, Any] | None) -> dict[str, Variant]:
    if model is None:
        return {}
    em = EdgeModel.model_validate(model)
    variants = em.status.variants if em.status else []
    return {v.profile: v for v in variants or [] if v.state == "Ready" and v.digest and v.artifact}


def _class_counts(obj: dict[str, Any]) -> tuple[int, int, int]:
    st = obj.get("status", {})
    if obj["kind"] == "DaemonSet":
        return st.get("desiredNumberScheduled", 0), st.get("numberReady", 0), st.get("updatedNumberScheduled", 0)
    return obj["spec"].get("replicas", 0), st.get("readyReplicas", 0), st.get("updatedReplicas", 0)


def _counts(obj: dict[str, Any]) -> tuple[int, int, int]:
    return _class_counts(obj) if _observed(obj) else (0, 0, 0)


def _behind(obj: dict[str, Any]) -> bool:
    """Whether some pod of this workload is not yet updated and ready."""
    desired, ready, updated = _counts(obj)
    return not _observed(obj) or not desired == ready == updated


def _observed(obj: dict[str, Any]) -> bool:
    return bool(obj.get("status", {}).get("observedGeneration", 0) >= obj["metadata"].get("generation", 0))


def reconcile_deployment(kube: Kube, settings: Settings, namespace: str, name: str,
                         world: World | None = None) -> float | None:
    """Converge one EdgeDeployment; returns seconds until it wants another look (a rollout in waves)."""
    raw = kube.find("EdgeDeployment", name, namespace)
    if raw is None or raw["metadata"].get("deletionTimestamp"):
        POD_READS.forget(namespace, name)
        PIPELINE_THROTTLE.forget(namespace, name)
        return None  # owner references let the garbage collector remove what we made
    try:
        ed = EdgeDeployment.model_validate(raw)
    except ValidationError as err:  # admission should have refused it: report, do not retry
        report_invalid_spec(kube, raw, err, AVAILABLE)
        return None
    world = world or World.read(kube)
    model = kube.find("EdgeModel", ed.spec.model_ref.name, namespace)
    variants = _ready_variants(model)

    fleet = {n: labels for n, labels in world.nodes.items() if label_selector_matches(ed.spec.node_selector, labels)}
    placement = resolve_nodes(fleet, world.profiles)
    per_class = Counter(p for p in placement.values() if p)
    unmatched = sum(1 for p in placement.values() if p is None)
    replicas = split_replicas(ed.spec.replicas or 0, dict(per_class)) if ed.spec.mode == "Replicas" else {}

    children: Children = {(kind, o["metadata"]["name"]): {**o, "kind": kind}  # list items carry no kind
                for kind in WORKLOAD_KINDS for o in kube.list(kind, namespace, child_labels(name))}
    gated: dict[str, tuple[str, list[str]]] = {}
    host_only = (model or {}).get("spec", {}).get("optimization", {}).get("selection") == "host"
    evaluation = _evaluation(ed, model)
    transform = model_transform((model or {}).get("spec"))
    pipeline_problem = _pipeline_problem(ed, model, transform)
    rendered = ed if pipeline_problem is None else _without_pipeline(ed)  # no pipeline that could only crash
    applied, missing, rollouts, failures = _apply_classes(kube, settings, rendered, world, per_class, variants,
                                                          replicas, children, gated, host_only, evaluation, transform)
    service = _apply_service(kube, ed, namespace)
    _prune(kube, namespace, children, {(o["kind"], o["metadata"]["name"]) for o in applied.values()})
    health = _health(kube, namespace, name, applied, time.time())
    drift = _drift(kube, ed, model, applied)
    pipelines = _pipelines(kube, rendered, applied)
    _write_status(kube, raw, ed, Outcome(applied, missing, unmatched, model is not None, rollouts, failures,
                                         service, health, gated, drift, pipeline_problem, pipelines))
    waits = [d.requeue for d in rollouts.values() if d.requeue]
    if drift is not None and ed.spec.monitoring and ed.spec.monitoring.drift:  # the only timer monitoring adds
        waits.append(float(ed.spec.monitoring.drift.interval_seconds))
    if rendered.spec.pipeline is not None and applied:  # look at the pipelines' sources and sinks again
        waits.append(PIPELINE_READ_SECONDS)
    waits += [h.recheck for h in health.values() if h.recheck]
    if any(_behind(o) for o in applied.values()) or any(h.not_ready for h in health.values()):
        waits.append(RECHECK_SECONDS)
    return min(waits) if waits else None


def _apply_classes(kube: Kube, settings: Settings, ed: EdgeDeployment, world: World, per_class: Counter[str],
                   variants: dict[str, Variant], replicas: dict[str, int], children: Children,
                   gated: dict[str, tuple[str, list[str]]], host_only: bool = False,
                   evaluation: ConfigMapKeyRef | None = None, transform: str | None = None
                   ) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, Decision], dict[str, PermanentError]]:
    """Apply the workload of every class with a Ready variant that passes spec.rollout.gate. A class without
    one, held by the gate (into ``gated``), or whose workload the API refuses for good, keeps what it runs.
    Returns (applied, missing, rollouts, failures)."""
    namespace, name = ed.metadata["namespace"], ed.metadata["name"]
    kind = "DaemonSet" if ed.spec.mode == "PerNode" else "Deployment"
    profiles = {p.metadata["name"]: p for p in world.profiles}
    applied: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    rollouts: dict[str, Decision] = {}
    failures: dict[str, PermanentError] = {}
    for profile_name in sorted(per_class):
        variant = variants.get(profile_name)
        existing = children.get((kind, child_name(name, profile_name)))
        refused = class_refusal(profiles[profile_name], namespace)
        if refused is not None:  # fail closed: no workload, and one made before the refusal is pruned
            failures[profile_name] = PermanentError(refused.reason, refused.message, refused.fix)
            continue
        if variant is None:
            missing.append(profile_name)
            if existing is not None:  # recompiling or failed: keep serving what the nodes have
                applied[profile_name] = existing
            continue
        revoked = _revoked(ed, variant)
        if revoked is not None:
            failures[profile_name] = revoked
            if existing is not None:  # the class keeps what it runs
                applied[profile_name] = existing
            continue
        held = _gate(ed, variant, existing, host_only)
        if held is not None:
            gated[profile_name] = held
            if existing is not None:  # the old variant keeps serving
                applied[profile_name] = existing
            continue
        try:
            applied[profile_name] = _apply_class(kube, settings, ed, profiles[profile_name], variant, world,
                                                 replicas.get(profile_name), existing, rollouts, evaluation,
                                                 transform)
        except (PlacementError, ApiError) as err:
            problem = as_permanent(err, f"{kind} {namespace}/{child_name(name, profile_name)}")
            if problem is None:
                raise
            log.warning("EdgeDeployment %s/%s class %s: %s", namespace, name, profile_name, problem)
            failures[profile_name] = problem
            if existing is not None:  # keep serving what the nodes have
                applied[profile_name] = existing
    return applied, missing, rollouts, failures


def _revoked(ed: EdgeDeployment, variant: Variant) -> PermanentError | None:
    """VariantRevoked when spec.trust.revokedDigests lists the class's variant: signed or not, it does not roll
    out (signatures prove origin, not freshness)."""
    trust = ed.spec.trust
    if trust is None or not trust.revoked_digests or variant.digest not in trust.revoked_digests:
        return None
    return PermanentError(
        "VariantRevoked", f"the variant {variant.digest} is listed in spec.trust.revokedDigests",
        "publish a new variant (change the EdgeModel, or delete its compile report to recompile), or remove the "
        "digest from spec.trust.revokedDigests; the class keeps serving what it runs")


def _gate(ed: EdgeDeployment, variant: Variant, existing: dict[str, Any] | None, host_only: bool = False
          ) -> tuple[str, list[str]] | None:
    """(Wait | Fail, why) when spec.rollout.gate holds ``variant`` back; None when it may roll out. A class
    already serving this digest is not held (a gate added later stops new variants, not what runs). A model
    measured on the host only (optimization.selection host) never gets on-target numbers: Fail, with the fix."""
    if ed.spec.rollout.gate is None or (existing is not None and _served_digest(existing) == variant.digest):
        return None
    if host_only and variant.on_target is None:
        return "Fail", [f"EdgeModel {ed.spec.model_ref.name} has optimization.selection host, so no on-target "
                        "numbers will come; set it to onTarget (or remove it) or remove spec.rollout.gate"]
    if variant.selection == "host" and variant.on_target is None:
        return "Fail", [f"the variant was selected on the compile host ({variant.reason}), so it has no on-target "
                        f"numbers: {(variant.message or '').rpartition('selected on the compile host: ')[2]}"]
    verdict, why = gate_verdict(ed.spec.rollout.gate, variant.on_target, ed.spec.runtime.threads)
    return None if verdict == "Pass" else (verdict, why)


@dataclass
class Outcome:
    """What one reconcile did and saw, for the status."""

    applied: dict[str, dict[str, Any]]  # class -> its live workload
    missing: list[str]  # classes without a Ready variant
    unmatched: int  # selected nodes that match no profile
    model_found: bool
    rollouts: dict[str, Decision]
    failures: dict[str, PermanentError]  # classes whose workload could not be applied
    service: PermanentError | None
    health: dict[str, ClassHealth]
    gated: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # class -> (Wait | Fail, why)
    drift: tuple[bool | None, str, str] | None = None  # the Drifting condition; None: drift is off
    pipeline_problem: str | None = None  # why spec.pipeline is not rendered (the fix included)
    pipelines: tuple[str, str] | None = None  # (reason, message): a pipeline source or sink is unreachable


def _pipeline_problem(ed: EdgeDeployment, model: dict[str, Any] | None, transform: str | None) -> str | None:
    """Why spec.pipeline cannot run with this EdgeModel (it turns frames into the model's input with the model's
    spec.preprocessing.image), with the fix; None when it can or is not asked for."""
    if ed.spec.pipeline is None or model is None:
        return None
    declared = (model.get("spec") or {}).get("preprocessing") or {}
    if transform is not None and isinstance(declared, dict) and declared.get("image") is not None:
        return None  # model_transform validated it
    return (f"spec.pipeline needs EdgeModel {ed.spec.model_ref.name!r} to declare spec.preprocessing.image (how a "
            "frame becomes the model's input); add it to the EdgeModel, or remove spec.pipeline. The runtime "
            "serves without the pipeline meanwhile")


def _without_pipeline(ed: EdgeDeployment) -> EdgeDeployment:
    return ed.model_copy(update={"spec": ed.spec.model_copy(update={"pipeline": None})})


def _pipelines(kube: Kube, ed: EdgeDeployment, applied: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """An unreachable pipeline source or sink, from the pods' pipeline /metrics (nothing read without a rendered
    spec.pipeline)."""
    if ed.spec.pipeline is None or not applied:
        PIPELINE_THROTTLE.forget(ed.metadata["namespace"], ed.metadata["name"])
        return None

    def read() -> tuple[str, str] | None:
        pods = kube.list("Pod", ed.metadata["namespace"], child_labels(ed.metadata["name"]))
        return pipeline_unreachable(ed, read_pipelines(pods, ed))

    return PIPELINE_THROTTLE.read(ed, read)


def _evaluation(ed: EdgeDeployment, model: dict[str, Any] | None) -> ConfigMapKeyRef | None:
    """The EdgeModel's evaluation data as the runtime's drift reference (spec.monitoring.drift, configMap only)."""
    if model is None or ed.spec.monitoring is None or ed.spec.monitoring.drift is None or missing_evaluation(
            model, ""):
        return None
    return ConfigMapKeyRef.model_validate(model["spec"]["optimization"]["evaluation"]["configMap"])


def _drift(kube: Kube, ed: EdgeDeployment, model: dict[str, Any] | None, applied: dict[str, dict[str, Any]]
           ) -> tuple[bool | None, str, str] | None:
    """The Drifting condition from the pods' /metrics (None, reading nothing, when drift is off)."""
    if ed.spec.monitoring is None or ed.spec.monitoring.drift is None:
        THROTTLE.forget(ed.metadata["namespace"], ed.metadata["name"])
        return None
    missing = missing_evaluation(model, ed.spec.model_ref.name)

    def read() -> tuple[bool | None, str, str]:
        pods = [] if missing else kube.list("Pod", ed.metadata["namespace"], child_labels(ed.metadata["name"]))
        return verdict(ed, read_pods(pods, ed) if pods else {}, sorted(applied), missing)

    return THROTTLE.read(ed, read)


def _apply_class(kube: Kube, settings: Settings, ed: EdgeDeployment, profile: HardwareProfile, variant: Variant,
                 world: World,
                 replicas: int | None, existing: dict[str, Any] | None, rollouts: dict[str, Decision],
                 evaluation: ConfigMapKeyRef | None = None, transform: str | None = None) -> dict[str, Any]:
    """Render and apply the workload of one class (a wave of a rollout); the live object."""
    profile_name = profile.metadata["name"]

    def render(shown: Variant, deltas: list[str]) -> dict[str, Any]:
        return render_class(ed, profile, shown, world.profiles, settings.node_cache, replicas,
                            settings.artifact_insecure, evaluation, settings.node_cache_driver, transform, deltas,
                            settings.registry_token_audience)

    patches: dict[str, dict[str, str | None]] = {}
    decision: Decision | None
    if controlled(ed):  # rollout.prefetch: updates reach the pods through their annotations
        manifest, decision, patches = controlled_class(kube, settings, ed, profile, variant, existing, render,
                                                       scrape, time.time())
    else:
        deltas, record = plain_deltas(settings, ed, profile_name, existing, variant)
        manifest = render(variant, deltas)
        manifest = with_record(manifest, record) if record else manifest
        decision = _decide(kube, ed, manifest, existing) if waves_of(ed) else None
    if decision is not None:
        rollouts[profile_name] = decision
        manifest = decision.manifest
    live = apply_changed(kube, manifest, existing)
    apply_patches(kube, ed.metadata["namespace"], patches)
    for pod in decision.delete if decision else ():
        log.info("rollout %s/%s %s: replacing pod %s", ed.metadata["namespace"], ed.metadata["name"], profile_name,
                 pod)
        kube.delete("Pod", pod, ed.metadata["namespace"])
    return live


class PodReads:
    """A class behind is read (its pods listed) only once it has made no progress for `seconds` (no more pods
    Ready, same workload generation), then at most once per `seconds`; until then it counts as starting and the
    last answer stands. During a rollout the DaemonSets' status changes many times a second, each change is a
    reconcile, and at 10,000 nodes a class's pods are thousands of objects: listing them while the class moves
    took the API server's CPU from starting those pods. In memory: a restart waits `seconds` again."""

    def __init__(self, seconds: float = RECHECK_SECONDS) -> None:
        self.seconds = seconds
        self._progress: dict[tuple[str, str, str], tuple[int, int, float]] = {}  # generation, ready, since
        self._last: dict[tuple[str, str, str], tuple[float, ClassHealth]] = {}  # read at, answer

    def health(self, key: tuple[str, str, str], generation: int, ready: int, now: float,
               read: Callable[[], ClassHealth]) -> ClassHealth | None:
        """The class's health; None while it is starting (progress within `seconds`) and was never read."""
        seen = self._progress.get(key)
        if seen is None or seen[0] != generation or ready > seen[1]:
            self._progress[key] = seen = (generation, ready, now)
            self._last.pop(key, None)
        elif ready < seen[1]:  # pods replaced: progress is measured from the new count
            self._progress[key] = seen = (generation, ready, seen[2])
        if now - seen[2] < self.seconds:
            return None
        last = self._last.get(key)  # cleared above when the generation changes or the class moves
        if last and 0 <= now - last[0] < self.seconds:
            return last[1]
        health = read()
        self._last[key] = (now, health)
        return health

    def forget(self, namespace: str, name: str) -> None:
        for table in (self._progress, self._last):
            for key in [k for k in table if k[:2] == (namespace, name)]:
                del table[key]


POD_READS = PodReads()


def _health(kube: Kube, namespace: str, name: str, applied: dict[str, dict[str, Any]], now: float
            ) -> dict[str, ClassHealth]:
    """Why the pods of each class that is not ready are not: a pod list per surge class on every look, and per
    other class behind once it stalls (POD_READS). A class whose pods keep becoming Ready is starting."""
    health = {}
    for profile, obj in applied.items():
        read = functools.partial(_class_health, kube, namespace, {**child_labels(name), PROFILE_LABEL: profile}, now)
        if _surges(obj):  # its counts cannot tell a failing new pod: read on every look, as each event may matter
            health[profile] = read()
        elif _behind(obj):
            found = POD_READS.health((namespace, name, profile), obj["metadata"].get("generation", 0),
                                     _counts(obj)[1], now, read)
            if found is not None:
                health[profile] = found
    return health


def _class_health(kube: Kube, namespace: str, labels: dict[str, str], now: float) -> ClassHealth:
    return class_health(kube.list("Pod", namespace, labels), now)


def _surges(obj: dict[str, Any]) -> bool:
    """A DaemonSet that starts a node's new pod beside the old one: its counts look complete while the new pod
    fails (the old one is Ready and the node counts as updated), so only its pods tell."""
    rolling = (obj["spec"].get("updateStrategy") or {}).get("rollingUpdate") or {}
    return obj["kind"] == "DaemonSet" and str(rolling.get("maxSurge", 0)) not in ("0", "0%")


def _decide(kube: Kube, ed: EdgeDeployment, manifest: dict[str, Any], existing: dict[str, Any] | None) -> Decision:
    meta = manifest["metadata"]
    pods = kube.list("Pod", meta["namespace"], manifest["spec"]["selector"]["matchLabels"]) if existing else []
    rollout = ed.spec.rollout
    return decide(manifest, existing, pods, waves_of(ed) or [100], rollout.max_unavailable,
                  rollout.health_gate.min_ready_seconds, rollout.health_gate.timeout_seconds,
                  rollout.auto_rollback, time.time())


def _apply_service(kube: Kube, ed: EdgeDeployment, namespace: str) -> PermanentError | None:
    """Apply (or remove) the Service; a refusal the user must fix is returned, not raised."""
    name = ed.metadata["name"]
    try:
        live = kube.find("Service", name, namespace)
        if ed.spec.service.enabled:
            apply_changed(kube, render_service(ed), live)
        elif live is not None:
            kube.delete("Service", name, namespace)
    except ApiError as err:
        problem = as_permanent(err, f"Service {namespace}/{name}")
        if problem is None:
            raise
        return problem
    return None


def _prune(kube: Kube, namespace: str, children: Children, keep: set[tuple[str, str]]) -> None:
    """Delete workloads of classes that no longer have nodes (or a variant, or the mode changed)."""
    for kind, child in children:
        if (kind, child) not in keep:
            log.info("deleting %s %s/%s: its class has no nodes or variant now", kind, namespace, child)
            kube.delete(kind, child, namespace)


def _served_digest(obj: dict[str, Any]) -> str | None:
    digest = obj["spec"]["template"]["metadata"].get("annotations", {}).get("edgefleet.io/variant-digest")
    return str(digest) if digest else None


def _write_status(kube: Kube, raw: dict[str, Any], ed: EdgeDeployment, out: Outcome) -> None:
    generation = raw["metadata"].get("generation")
    old = raw.get("status") or {}
    classes: list[dict[str, Any]] = []
    for profile_name in sorted(set(out.applied) | set(out.failures) | set(out.gated)):
        obj = out.applied.get(profile_name)
        desired, ready, updated = _counts(obj) if obj else (0, 0, 0)
        entry: dict[str, Any] = {"profile": profile_name, "desired": desired, "ready": ready, "updated": updated}
        digest = _served_digest(obj) if obj else None
        if digest:
            entry["digest"] = digest
        if profile_name in out.rollouts:
            entry["rollout"] = out.rollouts[profile_name].progress
            entry.update(_update_status(out.rollouts[profile_name]))
        message = _class_message(out, profile_name)
        if message:
            entry["message"] = message[:1024]
        classes.append(entry)
    desired = sum(c["desired"] for c in classes)
    ready = sum(c["ready"] for c in classes)
    settled = all(_observed(o) for o in out.applied.values())
    complete = settled and not out.failures and all(c["ready"] == c["desired"] == c["updated"] for c in classes)
    surging = any(h.not_ready for h in out.health.values())  # a surge pod not Ready yet: counts look complete
    conds = old.get("conditions", [])
    conds = set_condition(conds, AVAILABLE, bool(classes) and complete and desired > 0,
                          "AllClassesReady" if complete and classes else "ClassesNotReady",
                          f"{ready}/{desired} pods ready across {len(classes)} hardware classes", generation)
    why = "; ".join(f"{c['profile']}: {c['message']}" for c in classes if c.get("message"))
    updating = any(isinstance(d, ControlledDecision) and d.pending for d in out.rollouts.values())
    done = complete and not out.gated and not surging and not updating  # held by a gate or an update: not done
    conds = set_condition(conds, PROGRESSING, not done,
                          "RollingOut" if not done else "RolloutComplete",
                          (why or "waiting for pods to be updated and ready") if not done
                          else "every class is up to date", generation)
    if out.drift is not None:
        conds = set_condition(conds, DRIFTING, *out.drift, generation)
    else:
        conds = [c for c in conds if c["type"] != DRIFTING]
    problem = _degraded(ed, out)
    conds = set_condition(conds, DEGRADED, problem is not None, problem[0] if problem else "AsExpected",
                          problem[1] if problem else "every matching node has a variant to serve", generation)
    status = status_patch("EdgeDeployment", observed_generation=generation, conditions=conds, classes=classes,
                          unmatched_nodes=out.unmatched, nodes_ready=f"{ready}/{desired}")
    if out.unmatched and out.unmatched != old.get("unmatchedNodes", 0):
        kube.event(raw, "NodesWithoutProfile",
                   f"{out.unmatched} nodes match spec.nodeSelector but no HardwareProfile; they run nothing",
                   "Warning")
    if _same(old, status):
        return
    kube.patch_status("EdgeDeployment", ed.metadata["name"], ed.metadata["namespace"], status)
    for c in flipped(old.get("conditions", []), conds):
        if c["type"] in (AVAILABLE, DEGRADED) and (c["type"] == AVAILABLE or c["status"] == "True"):
            kube.event(raw, c["reason"], c["message"], "Warning" if c["type"] == DEGRADED else "Normal")
        elif c["type"] == DRIFTING and (c["status"] != "Unknown" or c["reason"] == "EvaluationDataMissing"):
            kube.event(raw, c["reason"], c["message"], "Normal" if c["status"] == "False" else "Warning")


def _class_message(out: Outcome, profile_name: str) -> str | None:
    failure = out.failures.get(profile_name)
    health = out.health.get(profile_name)
    gate = out.gated.get(profile_name)
    update = out.rollouts.get(profile_name)
    waiting = update.waiting if isinstance(update, ControlledDecision) else None
    parts = [str(failure) if failure else None, health.message if health else None,
             f"rollout gate: {'; '.join(gate[1])}" if gate else None, f"update: {waiting}" if waiting else None]
    return "; ".join(p for p in parts if p) or None


def _update_status(decision: Decision) -> dict[str, Any]:
    """status.classes[] prefetch and shadow of a class under rollout.prefetch."""
    if not isinstance(decision, ControlledDecision):
        return {}
    return {k: v for k, v in (("prefetch", decision.prefetch), ("shadow", decision.shadow)) if v}


def _degraded(ed: EdgeDeployment, out: Outcome) -> tuple[str, str] | None:
    """(reason, message with the fix) of what the user must act on first, or None."""
    stopped = {p: d.problem for p, d in out.rollouts.items() if isinstance(d, ControlledDecision) and d.problem}
    if stopped:  # ShadowDisagreement, ShadowInconclusive, RolledBack (in place), RolloutFailed, PrefetchFailed
        reason = stopped[min(stopped)][0]
        return reason, "; ".join(f"{p}: {why[1]}" for p, why in sorted(stopped.items()))
    back = {p: d.rolled_back for p, d in out.rollouts.items() if d.rolled_back}
    paused = {p: d.failed for p, d in out.rollouts.items() if d.failed}
    stuck = {p: h.stuck for p, h in out.health.items() if h.stuck}
    if back:
        return "RolledBack", "; ".join(f"{p}: {why}" for p, why in sorted(back.items()))
    if paused:
        return "RolloutFailed", "; ".join(f"{p}: {why}" for p, why in sorted(paused.items()))
    gate_failed = {p: why for p, (verdict, why) in out.gated.items() if verdict == "Fail"}
    if gate_failed:
        return "GateFailed", ("; ".join(f"{p}: {'; '.join(why)}" for p, why in sorted(gate_failed.items()))
                              + ". The class keeps serving its previous variant. Fix: a faster or smaller variant"
                              " (EdgeModel optimization) or looser limits in spec.rollout.gate")
    if out.failures:
        first = out.failures[min(out.failures)]
        return first.reason, "; ".join(f"{p}: {err}" for p, err in sorted(out.failures.items()))
    if out.service:
        return out.service.reason, str(out.service)
    if stuck:
        why = "; ".join(f"{p}: {out.health[p].message}. Fix: {h.fix}" for p, h in sorted(stuck.items()))
        return stuck[min(stuck)].reason, why
    if out.pipeline_problem:
        return "PipelineNeedsPreprocessing", out.pipeline_problem
    if out.pipelines:
        return out.pipelines
    if not out.model_found:
        return "ModelNotFound", f"EdgeModel {ed.spec.model_ref.name!r} does not exist in this namespace"
    if out.missing:
        return "VariantMissing", ("no Ready variant yet for hardware classes " + ", ".join(out.missing)
                                  + "; see the EdgeModel's status.variants")
    return None


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    keys = ("observedGeneration", "classes", "unmatchedNodes", "nodesReady")
    return all(old.get(k) == new.get(k) for k in keys) and without_times(old.get("conditions", [])) == without_times(
        new["conditions"])
