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

from .rollout import parse_time

UNSCHEDULABLE_GRACE_SECONDS = 30.0
STUCK_WAITING = frozenset({"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                           "ErrImageNeverPull", "CreateContainerConfigError", "CreateContainerError",
                           "RunContainerError"})
_AVAILABLE = re.compile(r"^\d+/\d+ nodes are available: (.*)$")
_NOT_HERE = ("didn't match Pod's node affinity/selector", "didn't match pod's node affinity/selector")


@dataclass(frozen=True)
class PodProblem:
    state: str  # Pending, CrashLoopBackOff, ImagePullBackOff, ...
    detail: str  # e.g. Insufficient nvidia.com/gpu
    fix: str
    stuck_in: float  # seconds until it counts as stuck; 0 when it already does


@dataclass(frozen=True)
class ClassHealth:
    message: str | None  # e.g. "2/2 pods Pending: Insufficient nvidia.com/gpu"; None when nothing is wrong
    stuck: PodProblem | None  # the first problem that needs the user, if any
    recheck: float | None  # seconds until a problem seen now counts as stuck


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


def _condition(pod: dict, type_: str) -> dict | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _ready(pod: dict) -> bool:
    ready = _condition(pod, "Ready")
    return bool(ready and ready.get("status") == "True")


def pod_problem(pod: dict, now: float) -> PodProblem | None:
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


def _unschedulable(scheduled: dict, now: float) -> PodProblem:
    detail = scheduler_reason(scheduled.get("message") or "") or scheduled.get("reason") or "not scheduled"
    since = parse_time(scheduled.get("lastTransitionTime")) or now
    stuck_in = max(0.0, UNSCHEDULABLE_GRACE_SECONDS - (now - since))
    if "Insufficient" in detail:
        fix = ("other pods hold these resources on the class's nodes: free them, add nodes that have them, or "
               "narrow spec.nodeSelector to nodes with room")
    else:
        fix = "make the class's nodes schedulable for these pods (taints, capacity) or narrow spec.nodeSelector"
    return PodProblem("Pending", detail, fix, stuck_in)


def _not_running(pod: dict, where: str, cs: dict, waiting: dict) -> PodProblem:
    last = (cs.get("lastState") or {}).get("terminated") or {}
    if last:
        why = f"exited {last.get('exitCode', '?')} ({last.get('reason') or 'Error'})"
        if last.get("message"):
            why += f": {last['message'].strip()[:300]}"
    else:
        why = (waiting.get("message") or "").strip()[:300]
    detail = f"{where} {cs.get('name', '?')} {why}".strip()
    meta = pod.get("metadata") or {}
    if "Image" in waiting["reason"]:
        fix = "check the HardwareProfile's runtimeImage: it must exist and be pullable from the nodes"
    else:
        fix = (f"read the logs: kubectl logs -n {meta.get('namespace', '')} {meta.get('name', '')} "
               f"-c {cs.get('name', '')} --previous")
    return PodProblem(waiting["reason"], detail, fix, 0.0)


def class_health(pods: list[dict], now: float) -> ClassHealth:
    """One line per kind of problem over the live pods of a class, most common first."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    problems = [pp for p in live if (pp := pod_problem(p, now))]
    if not problems:
        return ClassHealth(None, None, None)
    groups = Counter((p.state, p.detail) for p in problems)
    message = "; ".join(f"{n}/{len(live)} pods {state}: {detail}" for (state, detail), n in groups.most_common(3))
    stuck = next((p for p in problems if p.stuck_in == 0), None)
    waiting = [p.stuck_in for p in problems if p.stuck_in > 0]
    return ClassHealth(message, stuck, min(waiting) if waiting else None)
