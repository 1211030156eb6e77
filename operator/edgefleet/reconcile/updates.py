"""Updates that respect the edge (spec.rollout.prefetch, activation, shadow) and delta downloads.

With rollout.prefetch the runtime pods take their orders from their own annotations (a downward-API volume that
`serve --control-dir` reads, edgefleet_runtime.control) and report on /metrics what they did. The pod template
stays on the *pinned* variant (the last one every node served) while a new *target* variant goes through:

1. prefetch: every pod gets `edgefleet.io/prefetch` (ref, digest, deltas); the runtime fetches and verifies it
   into the node cache. Activation waits until every node holds it, or until prefetch.deadlineSeconds, then goes
   on with the nodes that hold it (the others join when they do). Nothing activates on a node without it.
2. shadow (rollout.shadow): the first wave's pods get `edgefleet.io/shadow`; their runtimes mirror a sample of
   requests to the target and export the agreement, which the operator sums over those pods. Below minAgreement
   after minRequests samples (or too few samples by maxDurationSeconds) the update stops for good: the shadow is
   removed, the pinned variant keeps serving, Degraded ShadowDisagreement (ShadowInconclusive) with the numbers.
3. hold: activation.after and activation.manual (approvedDigest) hold the activation.
4. activation in waves (rollout.waves / canaryPercent, else one wave): in place, chosen pods get
   `edgefleet.io/active-digest` and count as updated once their runtime reports the target active; a wave not
   done within healthGate.timeoutSeconds rolls every pod back to the pinned digest (autoRollback) or pauses.
   With activation.inPlace false the template changes to the target instead and rollout.decide replaces pods.
5. complete: the target becomes the pinned variant and the template names it (in place, the template hash
   leaves the variant out, so the running pods are not restarted for it).

What the update has done so far is kept on the workload in the `edgefleet.io/update` annotation (level-based:
each reconcile recomputes the plan from the pods and that record). Deltas: when a class moves from one variant
to another, the target is also published as a delta against the one its nodes hold (artifacts.publish_delta),
once per target, and its `--delta` values go to the fetch init container and the prefetch annotation.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ..api import EdgeDeployment, HardwareProfile, Variant
from ..api.models import Rollout
from ..artifacts import own_store, publish_delta
from ..artifacts.store import StoreError
from ..render import waves_of
from ..render.workload import ACTIVE_ANNOTATION, DIGEST_ANNOTATION, PREFETCH_ANNOTATION, SHADOW_ANNOTATION, in_place
from .drift import READ_DEADLINE_SECONDS, why
from .rollout import Decision, PodView, decide, max_unavailable_count, plan_wave

log = logging.getLogger(__name__)
RECORD = "edgefleet.io/update"  # on the workload: what the update of its class has done so far (JSON)
MAX_FAILURES = 20  # failed nodes named in status
REQUEUE_SECONDS = 5.0  # while an update is in progress


@dataclass(frozen=True)
class Ref:
    digest: str
    artifact: str


@dataclass
class PodControl:
    """One runtime pod: its annotations and what its /metrics say about the control folder."""

    name: str
    node: str
    ready: bool
    annotations: dict[str, str] = field(default_factory=dict)
    states: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, digest) -> state
    reasons: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, digest) -> why it failed
    shadow: dict[str, list[float]] = field(default_factory=dict)  # output -> [samples, top1 agree, cosine sum]
    error: str | None = None  # why its /metrics could not be read


@dataclass(frozen=True)
class UpdatePlan:
    patches: dict[str, dict[str, str | None]]  # pod -> annotations to set (None: remove)
    record: dict[str, Any]
    progress: str  # for status.classes[].rollout
    activate_template: bool = False  # restart path: render the target now
    complete: bool = False  # every pod serves the target (in place)
    prefetch: dict[str, Any] | None = None  # status.classes[].prefetch
    shadow: dict[str, Any] | None = None  # status.classes[].shadow
    problem: tuple[str, str] | None = None  # Degraded (reason, message with the fix)
    waiting: str | None = None  # why the update is not moving, for the class message


# ---------------------------------------------------------------- reading the pods


def parse_metrics(text: str, candidate: str) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str],
                                                       dict[str, list[float]]]:
    """(control states, their failure reasons, shadow counters of `candidate` per output) of a runtime's
    /metrics text. ValueError when it is not Prometheus text."""
    states: dict[tuple[str, str], str] = {}
    reasons: dict[tuple[str, str], str] = {}
    shadow: dict[str, list[float]] = {}
    slot = {"edgefleet_runtime_shadow_samples_total": 0, "edgefleet_runtime_shadow_top1_agree_total": 1,
            "edgefleet_runtime_shadow_cosine_sum_total": 2}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == "edgefleet_runtime_control" and s.value == 1:
                states[(labels.get("kind", ""), labels.get("digest", ""))] = labels.get("state", "")
            elif s.name == "edgefleet_runtime_control_reason" and s.value == 1:
                reasons[(labels.get("kind", ""), labels.get("digest", ""))] = labels.get("reason", "")
            elif s.name in slot and labels.get("candidate") == candidate:
                shadow.setdefault(labels.get("output", ""), [0.0, 0.0, 0.0])[slot[s.name]] = s.value
    return states, reasons, shadow


def pod_control(pod: dict[str, Any]) -> PodControl:
    meta, status = pod["metadata"], pod.get("status", {})
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
    return PodControl(meta["name"], pod.get("spec", {}).get("nodeName", ""), ready and not meta.get(
        "deletionTimestamp"), dict(meta.get("annotations") or {}))


def read_controls(pods: list[dict[str, Any]], port: int, candidate: str, fetch: Any) -> list[PodControl]:
    """Every pod's control state from its /metrics (``fetch(ip, port)``: drift.scrape, bounded), read
    concurrently within drift.READ_DEADLINE_SECONDS; a pod not Ready or not read says why in ``error``."""
    from concurrent.futures import ThreadPoolExecutor, wait

    views = [pod_control(p) for p in pods]
    todo = [(v, p) for v, p in zip(views, pods, strict=True) if v.ready and p.get("status", {}).get("podIP")]
    for v in views:
        if not v.ready:
            v.error = "pod not Ready"
    if not todo:
        return views
    pool = ThreadPoolExecutor(max_workers=min(8, len(todo)))
    futures = {v.name: pool.submit(fetch, p["status"]["podIP"], port) for v, p in todo}
    wait(futures.values(), timeout=READ_DEADLINE_SECONDS)
    pool.shutdown(wait=False, cancel_futures=True)
    for v, _ in todo:
        future = futures[v.name]
        if not future.done() or future.cancelled():
            v.error = f"metrics not read within {READ_DEADLINE_SECONDS:g} s"
            continue
        try:
            v.states, v.reasons, v.shadow = parse_metrics(future.result(), candidate)
        except Exception as e:  # unreachable, over a limit, not Prometheus text: the pod reports nothing
            v.error = ("metrics: the answer is not Prometheus text" if isinstance(e, ValueError)
                       else f"metrics: {why(e)}")[:200]
    return views


# ---------------------------------------------------------------- the plan (pure)


def _prefetch(pods: list[PodControl], target: str) -> tuple[list[PodControl], dict[str, Any]]:
    """(pods holding the target, status.classes[].prefetch)."""
    done, failed = [], []
    for p in sorted(pods, key=lambda p: p.node or p.name):
        state = p.states.get(("prefetch", target))
        if state == "done" or p.states.get(("active", target)) == "done":
            done.append(p)
        elif state in ("failed", "missing"):
            failed.append({"node": p.node or p.name, "reason": (p.reasons.get(("prefetch", target))
                                                                 or f"prefetch {state} (see the pod's log)")[:1024]})
    progress = {"digest": target, "done": len(done), "failed": len(failed),
                "pending": len(pods) - len(done) - len(failed), "failures": failed[:MAX_FAILURES]}
    return done, progress


def _agreement(pods: list[PodControl], kind: str) -> tuple[int, float | None]:
    """(samples, lowest agreement over outputs) summed over the shadowing pods."""
    totals: dict[str, list[float]] = {}
    for p in pods:
        for output, (n, top1, cosine) in p.shadow.items():
            t = totals.setdefault(output, [0.0, 0.0, 0.0])
            t[0], t[1], t[2] = t[0] + n, t[1] + top1, t[2] + cosine
    if not totals:
        return 0, None
    samples = int(min(t[0] for t in totals.values()))
    if samples == 0:
        return 0, None
    ratios = [(t[1] if kind == "top1" else t[2]) / t[0] for t in totals.values() if t[0]]
    return samples, max(0.0, min(1.0, min(ratios)))


def _first_wave(pods: list[PodControl], waves: list[int], nodes: int) -> list[PodControl]:
    return pods[:max(1, math.ceil(waves[0] * nodes / 100))]


def _shadow(rollout: Rollout, record: dict[str, Any], shadowing: list[PodControl], target: str, now: float
            ) -> tuple[str, dict[str, Any], tuple[str, str] | None]:
    """(Pending | Pass | Fail, status.classes[].shadow, Degraded problem) of the shadow phase."""
    spec = rollout.shadow
    assert spec is not None
    kept = record.get("shadow") or {}
    if kept.get("verdict") in ("Pass", "Fail"):  # decided: the numbers are kept, the verdict follows the spec
        samples, agreement = int(kept.get("samples", 0)), kept.get("agreement")
    else:
        samples, agreement = _agreement(shadowing, spec.agreement)
        kept = {"since": kept.get("since", now), "samples": samples, "agreement": agreement}
    status = {"digest": target, "samples": samples, "verdict": "Pending"}
    if agreement is not None:
        status["agreement"] = round(float(agreement), 4)
    numbers = (f"{spec.agreement} agreement {agreement if agreement is None else round(agreement, 4)} over "
               f"{samples} samples")
    if samples >= spec.min_requests and agreement is not None:
        verdict = "Pass" if agreement >= spec.min_agreement else "Fail"
        record["shadow"] = {**kept, "verdict": verdict}
        status["verdict"] = verdict
        if verdict == "Fail":
            return verdict, status, ("ShadowDisagreement", (
                f"the new variant {target} disagrees with the served one on live inputs: {numbers}, under "
                f"spec.rollout.shadow.minAgreement {spec.min_agreement:g}; it is not activated and the served "
                "variant keeps serving. Fix: publish a better variant (recompile the EdgeModel), or lower "
                "minAgreement"))
        return verdict, status, None
    if now - float(kept["since"]) > spec.max_duration_seconds:
        record["shadow"] = {**kept, "verdict": "Fail"}
        status["verdict"] = "Fail"
        return "Fail", status, ("ShadowInconclusive", (
            f"the shadow phase of {target} gathered {samples} of spec.rollout.shadow.minRequests "
            f"{spec.min_requests} samples in maxDurationSeconds {spec.max_duration_seconds}; it is not activated. "
            "Fix: raise sampleRate or maxDurationSeconds, or lower minRequests"))
    record["shadow"] = kept
    return "Pending", status, None


def _reopened(rollout: Rollout, record: dict[str, Any], now: float) -> bool:
    """Whether a shadow verdict that stopped the update no longer holds under the current spec (minAgreement
    lowered, maxDurationSeconds raised, ...): the kept numbers decide; the update goes on (mutates ``record``)."""
    failed, kept, spec = record.get("failed") or {}, record.get("shadow") or {}, rollout.shadow
    if spec is None or failed.get("reason") not in ("ShadowDisagreement", "ShadowInconclusive"):
        return False
    samples, agreement = int(kept.get("samples", 0)), kept.get("agreement")
    enough = samples >= spec.min_requests and agreement is not None
    if enough and float(agreement or 0.0) >= spec.min_agreement:
        record["shadow"] = {**kept, "verdict": "Pass"}
    elif not enough and now - float(kept.get("since", now)) <= spec.max_duration_seconds:
        record["shadow"] = {k: v for k, v in kept.items() if k != "verdict"}
    else:
        return False
    del record["failed"]
    return True


def _kept_shadow(record: dict[str, Any]) -> dict[str, Any]:
    kept = record.get("shadow") or {}
    out = {"samples": int(kept.get("samples", 0)), "verdict": kept.get("verdict", "Pending")}
    if kept.get("agreement") is not None:
        out["agreement"] = round(float(kept["agreement"]), 4)
    return out


def _held(rollout: Rollout, target: str, now: float) -> str | None:
    activation = rollout.activation
    if activation is None:
        return None
    if activation.after is not None:
        after = activation.after if activation.after.tzinfo else activation.after.replace(tzinfo=datetime.UTC)
        if now < after.timestamp():
            return f"activation held until spec.rollout.activation.after {after.isoformat()}"
    if activation.manual and activation.approved_digest != target:
        return f"activation waits for approval: set spec.rollout.activation.approvedDigest to {target}"
    return None


def _annotations(pods: list[PodControl], wanted: dict[str, dict[str, str | None]]) -> dict[str, dict[str, str | None]]:
    """The patches that bring each pod's control annotations to ``wanted`` (only what differs)."""
    patches = {}
    for p in pods:
        diff = {k: v for k, v in wanted.get(p.name, {}).items() if p.annotations.get(k) != v}
        if diff:
            patches[p.name] = diff
    return patches


def settle(pods: list[PodControl], pinned: str) -> dict[str, dict[str, str | None]]:
    """No update in progress: no prefetch or shadow orders, and a pod told to serve another digest (an update
    withdrawn) is told to serve the pinned one."""
    wanted: dict[str, dict[str, str | None]] = {}
    for p in pods:
        want: dict[str, str | None] = {PREFETCH_ANNOTATION: None, SHADOW_ANNOTATION: None}
        if ACTIVE_ANNOTATION in p.annotations:
            want[ACTIVE_ANNOTATION] = pinned
        wanted[p.name] = {k: v for k, v in want.items() if p.annotations.get(k) != v}
    return _annotations(pods, wanted)


def plan_update(ed: EdgeDeployment, pinned: Ref, target: Ref, deltas: list[str], pods: list[PodControl],
                record: dict[str, Any], now: float) -> UpdatePlan:
    """What to tell each pod now, from the pods' reports and the record of what the update did so far."""
    rollout = ed.spec.rollout
    assert rollout.prefetch is not None
    if record.get("target") != target.digest:
        record = {"target": target.digest, "since": now}
    else:
        record = dict(record)
    order = json.dumps({"ref": target.artifact, "digest": target.digest, "deltas": deltas}, sort_keys=True,
                       separators=(",", ":"))
    wanted: dict[str, dict[str, str | None]] = {p.name: {PREFETCH_ANNOTATION: order} for p in pods}
    done, prefetch = _prefetch(pods, target.digest)
    failed = record.get("failed")
    if failed and _reopened(rollout, record, now):
        failed = None
    if failed:  # stopped for good: every pod serves the pinned variant
        for p in pods:
            wanted[p.name] = {SHADOW_ANNOTATION: None, ACTIVE_ANNOTATION: pinned.digest
                              if ACTIVE_ANNOTATION in p.annotations else None}
        shadow_status = None
        if rollout.shadow is not None and record.get("shadow"):
            _, shadow_status, _ = _shadow(rollout, record, [], target.digest, now)
        return UpdatePlan(_annotations(pods, wanted), record, failed.get("progress", "stopped"), prefetch=prefetch,
                          shadow=shadow_status, problem=(failed["reason"], failed["message"]))
    if record.get("activated"):  # restart path: the template names the target; rollout.decide goes on
        return UpdatePlan(_annotations(pods, wanted), record, "activating", activate_template=True,
                          prefetch=prefetch, shadow=(record.get("shadow") or None) and {
                              "digest": target.digest, **_kept_shadow(record)})
    waiting_for = f"prefetch {prefetch['done']}/{len(pods)} nodes"
    if prefetch["failed"]:
        waiting_for += "; failed on " + ", ".join(f"{f['node']}: {f['reason']}" for f in prefetch["failures"][:3])
    deadline = now - float(record["since"]) >= rollout.prefetch.deadline_seconds
    started = "wave" in record  # activation began: a pod that comes back later joins when it holds the target
    if not pods or (not started and len(done) < len(pods) and not (deadline and done)):
        problem = None
        if deadline and pods:
            problem = ("PrefetchFailed", f"no node holds the new variant {target.digest} after "
                       f"spec.rollout.prefetch.deadlineSeconds {rollout.prefetch.deadline_seconds}: {waiting_for}. "
                       "Nothing is activated; fix the nodes' access to the artifact store (the runtime retries)")
        return UpdatePlan(_annotations(pods, wanted), record, f"prefetching {prefetch['done']}/{len(pods)}",
                          prefetch=prefetch, problem=problem, waiting=waiting_for)
    waves = waves_of(ed) or [100]
    shadow_status = None
    if rollout.shadow is not None:
        shadowing = _first_wave(done, waves, len(pods))
        verdict, shadow_status, problem = _shadow(rollout, record, shadowing, target.digest, now)
        if verdict == "Fail":
            assert problem is not None
            record["failed"] = {"reason": problem[0], "message": problem[1], "progress": "stopped by shadow"}
            return plan_update(ed, pinned, target, deltas, pods, record, now)
        if verdict == "Pending":
            order_shadow = json.dumps({"digest": target.digest, "sampleRate": rollout.shadow.sample_rate},
                                      sort_keys=True, separators=(",", ":"))
            for p in shadowing:
                wanted[p.name][SHADOW_ANNOTATION] = order_shadow
            return UpdatePlan(_annotations(pods, wanted), record,
                              f"shadow {shadow_status['samples']}/{rollout.shadow.min_requests} samples",
                              prefetch=prefetch, shadow=shadow_status,
                              waiting=f"shadow phase on {len(shadowing)} nodes")
    for p in pods:
        wanted[p.name][SHADOW_ANNOTATION] = None
    held = _held(rollout, target.digest, now)
    if held is not None:
        return UpdatePlan(_annotations(pods, wanted), record, "activation held", prefetch=prefetch,
                          shadow=shadow_status, waiting=held)
    if not in_place(ed):  # pods are replaced (rollout.decide), and start from the cached variant
        record["activated"] = True
        return UpdatePlan(_annotations(pods, wanted), record, "activating", activate_template=True,
                          prefetch=prefetch, shadow=shadow_status)
    return _activate(ed, pinned, target, pods, done, wanted, record, prefetch, shadow_status, now)


def _activate(ed: EdgeDeployment, pinned: Ref, target: Ref, pods: list[PodControl], done: list[PodControl],
              wanted: dict[str, dict[str, str | None]], record: dict[str, Any], prefetch: dict[str, Any],
              shadow_status: dict[str, Any] | None, now: float) -> UpdatePlan:
    """In place, wave by wave, among the pods that hold the target."""
    rollout = ed.spec.rollout
    waves = waves_of(ed) or [100]
    for p in pods:  # a pod already told keeps its order
        if p.annotations.get(ACTIVE_ANNOTATION) == target.digest:
            wanted[p.name][ACTIVE_ANNOTATION] = target.digest
    views = [PodView(p.name, p.node, "new" if p.states.get(("active", target.digest)) == "done" else "old",
                     0.0 if p.ready else None) for p in done]
    limit = max_unavailable_count(rollout.max_unavailable, len(done))
    stored = record.get("wave")  # [wave reached, when it started]
    first = plan_wave(views, "new", len(done), waves, limit, 0, rollout.health_gate.timeout_seconds, now, now)
    started = float(stored[1]) if stored and first.wave <= int(stored[0]) else now
    plan = plan_wave(views, "new", len(done), waves, limit, 0, rollout.health_gate.timeout_seconds, started, now)
    record["wave"] = [max(plan.wave, int(stored[0])) if stored and first.wave <= int(stored[0]) else plan.wave,
                      started]
    if plan.state == "Failed":
        if rollout.auto_rollback:
            message = (f"{plan.message}: the nodes did not report the new variant {target.digest} active; every "
                       f"node serves {pinned.digest} again. Fix: see the pods' logs (edgefleet_runtime.control), then "
                       "publish a new variant")
            record["failed"] = {"reason": "RolledBack", "message": message, "progress": "rolled back"}
            return plan_update(ed, pinned, target, [], pods, record, now)
        return UpdatePlan(_annotations(pods, wanted), record, "paused", prefetch=prefetch, shadow=shadow_status,
                          problem=("RolloutFailed", f"{plan.message}; rollout paused (autoRollback is off)"))
    for name in plan.delete:
        wanted[name][ACTIVE_ANNOTATION] = target.digest
    active = sum(1 for v in views if v.template_hash == "new")
    complete = plan.state == "Complete" and len(done) == len(pods)
    waiting = None if len(done) == len(pods) else f"{len(pods) - len(done)} nodes wait for the variant"
    progress = "complete" if complete else f"wave {plan.wave}/{len(waves)}: {active}/{len(pods)} active in place"
    return UpdatePlan(_annotations(pods, wanted), record, progress, complete=complete, prefetch=prefetch,
                      shadow=shadow_status, waiting=waiting)


# ---------------------------------------------------------------- applying it to one class


@dataclass(frozen=True)
class ControlledDecision(Decision):
    """A class under rollout.prefetch: the rollout decision plus where its update stands."""

    prefetch: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None
    problem: tuple[str, str] | None = None
    waiting: str | None = None
    pending: bool = False  # an update is in progress or held


def read_record(existing: dict[str, Any] | None) -> dict[str, Any]:
    text = ((existing or {}).get("metadata", {}).get("annotations") or {}).get(RECORD)
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def served(existing: dict[str, Any] | None) -> Ref | None:
    """The variant a live workload's template names (its digest annotation and its fetch's --ref)."""
    if existing is None:
        return None
    template = existing["spec"]["template"]
    digest = (template["metadata"].get("annotations") or {}).get(DIGEST_ANNOTATION)
    for c in template["spec"].get("initContainers", []):
        for arg in c.get("args", []) if c.get("name") == "fetch-model" else []:
            if arg.startswith("--ref=") and digest:
                return Ref(str(digest), arg[len("--ref="):])
    return None


def deltas_for(settings: Any, ed: EdgeDeployment, profile: str, base: Ref | None, target: Ref,
               record: dict[str, Any]) -> list[str]:
    """The target's `--delta` values against ``base`` (published once per target, kept in ``record``)."""
    kept = record.get("deltas")
    if isinstance(kept, dict) and kept.get("target") == target.digest:
        return [str(f) for f in kept.get("flags", [])]
    flags: list[str] = []
    if base is not None and base.digest != target.digest:
        try:
            login = (settings.artifact_insecure, settings.artifact_username, settings.artifact_password)
            oci = str(settings.artifact_store).startswith("oci://")
            own_store(settings.artifact_store, base.artifact if oci else None, *login)  # refuses another registry
            if not oci:
                _inside_local(str(settings.artifact_store), base.artifact, target.artifact)
            store = own_store(settings.artifact_store, target.artifact if oci else None, *login)  # delta beside it
            published = publish_delta(store, name=f"{ed.spec.model_ref.name}-{profile}", base_ref=base.artifact,
                                      base_digest=base.digest, target_ref=target.artifact,
                                      target_digest=target.digest)
            flags = [published.flag()] if published else []
            log.info("delta %s -> %s for %s: %s", base.digest, target.digest, profile,
                     f"{published.sizeBytes} bytes ({published.method})" if published else "not smaller than half")
        except (StoreError, OSError, ValueError) as e:  # the nodes download the full variant
            log.warning("no delta %s -> %s for %s: %s", base.digest, target.digest, profile, e)
    record["deltas"] = {"target": target.digest, "flags": flags}
    return flags


def _inside_local(root: str, *refs: str) -> None:
    """A local store reads only its own blobs: a ref elsewhere (a status naming /dev/zero) is refused."""
    from ..artifacts.store import LocalStore

    prefix = LocalStore(root).root.as_uri() + "/sha256/"
    for ref in refs:
        if not ref.startswith(prefix) or "/" in ref[len(prefix):]:
            raise StoreError(f"{ref} is not a blob of the operator's artifact store {root}")


def plain_deltas(settings: Any, ed: EdgeDeployment, profile: str, existing: dict[str, Any] | None, variant: Variant
                 ) -> tuple[list[str], dict[str, Any] | None]:
    """Without rollout.prefetch: the fetch's `--delta` values for a class moving to ``variant`` from the one its
    template names, and the record to keep on the workload (None: nothing to keep). The values stay while the
    target does, so the template does not change again once the class serves it."""
    assert variant.digest and variant.artifact
    record = read_record(existing)
    target = Ref(variant.digest, variant.artifact)
    base = served(existing)
    kept = record.get("deltas")
    if not (isinstance(kept, dict) and kept.get("target") == target.digest) and (base is None or base == target):
        return [], None
    flags = deltas_for(settings, ed, profile, base, target, record)
    return flags, {"deltas": record["deltas"]}


def with_record(manifest: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    meta = manifest["metadata"]
    annotations = {**meta.get("annotations", {}), RECORD: json.dumps(record, sort_keys=True, separators=(",", ":"))}
    return {**manifest, "metadata": {**meta, "annotations": annotations}}


def controlled_class(kube: Any, settings: Any, ed: EdgeDeployment, profile: HardwareProfile, variant: Variant,
                     existing: dict[str, Any] | None, render: Any, scrape: Any, now: float
                     ) -> tuple[dict[str, Any], ControlledDecision, dict[str, dict[str, str | None]]]:
    """(workload to apply, decision, pod annotation patches) of one class under rollout.prefetch. ``render(variant,
    deltas)``: render_class with everything but those; ``scrape(ip, port)``: a pod's /metrics (drift.scrape)."""
    assert variant.digest and variant.artifact
    record = read_record(existing)
    target = Ref(variant.digest, variant.artifact)
    kept = record.get("pinned")
    pinned = Ref(kept["digest"], kept["artifact"]) if isinstance(kept, dict) else served(existing) or target
    labels = {"edgefleet.io/deployment": ed.metadata["name"], "edgefleet.io/profile": profile.metadata["name"]}
    pods = kube.list("Pod", ed.metadata["namespace"], labels) if existing else []
    rollout = ed.spec.rollout
    args = (rollout.max_unavailable, rollout.health_gate.min_ready_seconds, rollout.health_gate.timeout_seconds,
            rollout.auto_rollback, now)
    if pinned == target:
        record = {"pinned": {"digest": target.digest, "artifact": target.artifact}}
        manifest = with_record(render(variant, []), record)
        d = decide(manifest, existing, pods, waves_of(ed) or [100], *args)
        patches = settle([pod_control(p) for p in pods], target.digest)
        return d.manifest, ControlledDecision(**vars(d)), patches
    deltas = deltas_for(settings, ed, profile.metadata["name"], pinned, target, record)
    controls = read_controls(pods, ed.spec.runtime.port, target.digest, scrape)
    plan = plan_update(ed, pinned, target, deltas, controls, record, now)
    record = {**plan.record, "pinned": {"digest": pinned.digest, "artifact": pinned.artifact},
              "deltas": {"target": target.digest, "flags": deltas}}
    base = variant.model_copy(update={"digest": pinned.digest, "artifact": pinned.artifact})
    shown = variant if plan.activate_template else base
    d = decide(with_record(render(shown, deltas if plan.activate_template else []), record), existing, pods,
               waves_of(ed) or [100], *args)
    done = plan.complete or (plan.activate_template and d.progress == "complete")
    if done:  # the target is what every node serves: it becomes the pinned variant
        record = {"pinned": {"digest": target.digest, "artifact": target.artifact}}
        d = decide(with_record(render(variant, deltas), record), existing, pods, waves_of(ed) or [100], *args)
    # the template's own rollout (pods replaced for a new template) speaks first, then the update's
    progress = d.progress if plan.activate_template or d.progress != "complete" else plan.progress
    decision = ControlledDecision(
        d.manifest, d.delete, progress, d.rolled_back, d.failed,
        None if done else min(d.requeue or REQUEUE_SECONDS, REQUEUE_SECONDS), prefetch=None if done else plan.prefetch,
        shadow=None if done else plan.shadow, problem=None if done else plan.problem,
        waiting=None if done else plan.waiting, pending=not done and not record.get("failed"))  # a problem the
    # nodes can still get past (PrefetchFailed: the runtime retries) keeps the update pending; a stop does not
    return d.manifest, decision, ({} if done else plan.patches)


def apply_patches(kube: Any, namespace: str, patches: dict[str, dict[str, str | None]]) -> None:
    """Set the pods' control annotations (a merge patch: None removes one). A pod gone meanwhile is skipped."""
    from ..kube import NotFound

    for pod, wanted in sorted(patches.items()):
        try:
            kube.patch("Pod", pod, namespace, {"metadata": {"annotations": wanted}})
        except NotFound:
            continue
