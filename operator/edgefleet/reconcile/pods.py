"""Why the pods of one hardware class are not ready, in words a user can act on (pure: pods in, text out).

The scheduler's PodScheduled condition says why a pod stays Pending ("Insufficient nvidia.com/gpu");
a container's waiting state says why it does not run (CrashLoopBackOff, ImagePullBackOff, ...). A pod
that is merely starting is no problem. A pod the scheduler refused counts as stuck once the refusal is
UNSCHEDULABLE_GRACE_SECONDS old (a rollout frees resources a moment later); a crash loop is stuck at once.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from edgefleet_runtime.exitcodes import EXIT_DIGEST, EXIT_SIGNATURE, EXIT_UNREACHABLE

from .rollout import parse_time

UNSCHEDULABLE_GRACE_SECONDS = 30.0
STUCK_WAITING = frozenset({"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                           "ErrImageNeverPull", "CreateContainerConfigError", "CreateContainerError",
                           "RunContainerError"})
_AVAILABLE = re.compile(r"^\d+/\d+ nodes are available: (.*)$")
_NOT_HERE = ("didn't match Pod's node affinity/selector", "didn't match pod's node affinity/selector")


IMAGE_WAITING = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
FETCH_CONTAINER = "fetch-model"
# the fetch init container's exit code (edgefleet_runtime.exitcodes) -> (condition reason, fix)
FETCH_FAILURES = {
    EXIT_UNREACHABLE: ("RegistryUnreachable",
                       "the class's nodes cannot reach the artifact store that holds the variant (the registry "
                       "in the variant's ref, chart value artifactStore.url): start it or fix the network between "
                       "the nodes and it; the pod retries with backoff and running pods keep serving their variant"),
    EXIT_DIGEST: ("VariantDigestMismatch",
                  "the artifact store holds other bytes under the variant's ref than its digest (overwritten or "
                  "tampered): publish the variant again (recompile: change the EdgeModel or delete its compile "
                  "report) and check who can write to the store; the node refused the bytes, running pods keep "
                  "serving their variant"),
    EXIT_SIGNATURE: ("VariantSignatureRefused",
                     "sign the variant with a key listed in spec.trust.publicKeysSecret (edgefleet sign), or "
                     "trust the key that signed it"),
}


@dataclass(frozen=True)
class PodProblem:
    state: str  # Pending, CrashLoopBackOff, ImagePullBackOff, ...
    detail: str  # e.g. Insufficient nvidia.com/gpu
    fix: str
    stuck_in: float  # seconds until it counts as stuck; 0 when it already does
    reason: str = "PodsFailing"  # the Degraded condition's reason: PodsUnschedulable, ImagePullFailed, ...


@dataclass(frozen=True)
class ClassHealth:
    message: str | None  # e.g. "2/2 pods Pending: Insufficient nvidia.com/gpu"; None when nothing is wrong
    stuck: PodProblem | None  # the first problem that needs the user, if any
    recheck: float | None  # seconds until a problem seen now counts as stuck
    not_ready: int = 0  # live pods not Ready (starting or stuck)


def scheduler_reason(message: str) -> str:
    """The part of a FailedScheduling message about the nodes the pod could run on:
    "0/9 nodes are available: 1 Insufficient nvidia.com/gpu, 8 node(s) didn't match Pod's node
    affinity/selector. preemption: ..." -> "Insufficient nvidia.com/gpu"."""
    head = message.split(" preemption:")[0].strip().rstrip(".")
    found = _AVAILABLE.match(head)
    if not found:
        return head
    parts = [re.sub(r"^\d+ ", "", p.strip()) for p in found.group(1).split(", ")]
    useful = [p for p in parts if not any(n in p for n in _NOT_HERE)]
    return ", ".join(useful or parts)


def _condition(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _ready(pod: dict[str, Any]) -> bool:
    ready = _condition(pod, "Ready")
    return bool(ready and ready.get("status") == "True")


def pod_problem(pod: dict[str, Any], now: float) -> PodProblem | None:
    """What keeps `pod` from running, or None when it runs or is only starting."""
    if _ready(pod):
        return None
    scheduled = _condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False":
        return _unschedulable(scheduled, now)
    status = pod.get("status") or {}
    for where, key in (("init container", "initContainerStatuses"), ("container", "containerStatuses")):
        for cs in status.get(key) or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                return _not_running(pod, where, cs, waiting)
    return None


def _unschedulable(scheduled: dict[str, Any], now: float) -> PodProblem:
    detail = scheduler_reason(scheduled.get("message") or "") or scheduled.get("reason") or "not scheduled"
    since = parse_time(scheduled.get("lastTransitionTime")) or now
    stuck_in = max(0.0, UNSCHEDULABLE_GRACE_SECONDS - (now - since))
    if "Insufficient" in detail:
        fix = ("other pods hold these resources on the class's nodes: free them, add nodes that have them, or "
               "narrow spec.nodeSelector to nodes with room")
    else:
        fix = "make the class's nodes schedulable for these pods (taints, capacity) or narrow spec.nodeSelector"
    return PodProblem("Pending", detail, fix, stuck_in, "PodsUnschedulable")


def _not_running(pod: dict[str, Any], where: str, cs: dict[str, Any], waiting: dict[str, Any]) -> PodProblem:
    last = (cs.get("lastState") or {}).get("terminated") or {}
    if last:
        why = f"exited {last.get('exitCode', '?')} ({last.get('reason') or 'Error'})"
        if last.get("message"):
            why += f": {last['message'].strip()[:300]}"
    else:
        why = (waiting.get("message") or "").strip()[:300]
    detail = f"{where} {cs.get('name', '?')} {why}".strip()
    meta = pod.get("metadata") or {}
    if waiting["reason"] in IMAGE_WAITING:
        profile = (meta.get("labels") or {}).get("edgefleet.io/profile", "")
        fix = (f"check the runtimeImage of HardwareProfile {profile} ({cs.get('image', '?')}): it must exist and "
               "be pullable from the class's nodes (registry, name, tag or digest, pull secret)")
        return PodProblem(waiting["reason"], detail, fix, 0.0, "ImagePullFailed")
    if where == "init container" and cs.get("name") == FETCH_CONTAINER and last.get("exitCode") in FETCH_FAILURES:
        reason, fix = FETCH_FAILURES[last["exitCode"]]
        return PodProblem(waiting["reason"], detail, fix, 0.0, reason)
    fix = (f"read the logs: kubectl logs -n {meta.get('namespace', '')} {meta.get('name', '')} "
           f"-c {cs.get('name', '')} --previous")
    return PodProblem(waiting["reason"], detail, fix, 0.0)


def class_health(pods: list[dict[str, Any]], now: float) -> ClassHealth:
    """One line per kind of problem over the live pods of a class, most common first."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    problems = [pp for p in live if (pp := pod_problem(p, now))]
    not_ready = sum(1 for p in live if not _ready(p))
    if not problems:
        return ClassHealth(None, None, None, not_ready)
    groups = Counter((p.state, p.detail) for p in problems)
    message = "; ".join(f"{n}/{len(live)} pods {state}: {detail}" for (state, detail), n in groups.most_common(3))
    stuck = next((p for p in problems if p.stuck_in == 0), None)
    waiting = [p.stuck_in for p in problems if p.stuck_in > 0]
    return ClassHealth(message, stuck, min(waiting) if waiting else None, not_ready)
