"""Rollout in waves with a health gate and automatic rollback, for the DaemonSet of one hardware class.

The DaemonSet uses the OnDelete strategy, so a new pod template reaches a node only when we delete
that node's pod. Each reconcile looks at the pods and decides, as a pure function, which outdated pods
to replace now: enough to reach the current wave's share of nodes, never more unavailable than
maxUnavailable, and only after the previous wave's new pods stayed Ready for minReadySeconds. A wave
that is not healthy within timeoutSeconds fails the rollout.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from typing import Any

from ..render import TEMPLATE_HASH


@dataclass(frozen=True)
class PodView:
    name: str
    node: str
    template_hash: str | None
    ready_since: float | None  # epoch seconds the pod has been Ready since; None when not Ready


@dataclass(frozen=True)
class WavePlan:
    wave: int  # 1-based wave in progress (len(waves) when complete)
    state: str  # InProgress | Complete | Failed
    delete: tuple[str, ...] = ()
    message: str = ""


def wave_targets(waves: list[int], nodes: int) -> list[int]:
    return [math.ceil(p * nodes / 100) for p in waves]


def max_unavailable_count(value: int | str, nodes: int) -> int:
    """maxUnavailable as a pod count (percentages round down, as Kubernetes does), at least 1."""
    if isinstance(value, str) and value.endswith("%"):
        return max(1, math.floor(int(value[:-1]) * nodes / 100))
    return max(1, int(value))


def pod_view(pod: dict[str, Any]) -> PodView:
    ready = next((c for c in pod.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
    since = None
    if ready and ready["status"] == "True" and not pod["metadata"].get("deletionTimestamp"):
        since = parse_time(ready.get("lastTransitionTime"))
    annotations = pod["metadata"].get("annotations", {})
    return PodView(pod["metadata"]["name"], pod["spec"].get("nodeName", ""), annotations.get(TEMPLATE_HASH), since)


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def plan_wave(pods: list[PodView], current: str, nodes: int, waves: list[int], max_unavailable: int,
              min_ready_seconds: float, timeout_seconds: float, wave_started: float, now: float) -> WavePlan:
    """Which outdated pods to replace now, and whether the rollout is complete or failed."""
    updated = [p for p in pods if p.template_hash == current]
    healthy = [p for p in updated if p.ready_since is not None and now - p.ready_since >= min_ready_seconds]
    targets = wave_targets(waves, nodes)
    wave = next((i for i, t in enumerate(targets) if len(healthy) < t), None)
    if wave is None:
        return WavePlan(len(waves), "Complete", message=f"{len(healthy)}/{nodes} nodes updated and healthy")
    target = targets[wave]
    if now - wave_started > timeout_seconds:
        return WavePlan(wave + 1, "Failed", message=(
            f"wave {wave + 1}/{len(waves)}: {len(healthy)}/{target} new pods healthy after "
            f"{now - wave_started:.0f}s (healthGate.timeoutSeconds {timeout_seconds:.0f})"))
    unavailable = sum(1 for p in pods if p.ready_since is None) + max(0, nodes - len(pods))
    outdated = [p for p in pods if p.template_hash != current]
    broken = sorted((p for p in outdated if p.ready_since is None), key=lambda p: p.node)
    serving = sorted((p for p in outdated if p.ready_since is not None), key=lambda p: p.node)
    need = max(0, target - len(updated))
    # replacing a pod that serves nothing costs no availability; serving pods wait for the budget
    replace = [p.name for p in broken[:need]]
    replace += [p.name for p in serving[:max(0, min(need - len(replace), max_unavailable - unavailable))]]
    return WavePlan(wave + 1, "InProgress", tuple(replace),
                    f"wave {wave + 1}/{len(waves)}: {len(healthy)}/{target} new pods healthy")


# ---------------------------------------------------------------- applying a plan to one DaemonSet

STABLE = "edgefleet.io/stable-template"  # the last template every node ran healthily
FAILED = "edgefleet.io/failed-template-hash"  # a template that failed its health gate: not retried
WAVE = "edgefleet.io/rollout-wave"  # "<template hash>:<wave>:<epoch seconds the wave started>"


@dataclass(frozen=True)
class Decision:
    manifest: dict[str, Any]  # the DaemonSet to apply (template possibly the stable one), with rollout annotations
    delete: tuple[str, ...]  # pods to replace now
    progress: str  # for status: wave i/n, complete, rolled back, paused
    rolled_back: str | None  # why, when the wanted template failed and the stable one is served
    failed: str | None  # why, when the rollout failed and autoRollback is off
    requeue: float | None  # seconds until the next look, while a rollout is in progress


def _hash(manifest: dict[str, Any]) -> str:
    return str(manifest["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH])


def _with_template(manifest: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    return {**manifest, "spec": {**manifest["spec"], "template": template}}


def decide(manifest: dict[str, Any], existing: dict[str, Any] | None, pods: list[dict[str, Any]],
           waves: list[int], max_unavailable: int | str,
           min_ready: float, timeout: float, auto_rollback: bool, now: float) -> Decision:
    """Level-based: from the wanted DaemonSet, the live one and its pods, what to apply and delete now."""
    notes = (existing or {}).get("metadata", {}).get("annotations", {})
    stable = json.loads(notes[STABLE]) if STABLE in notes else None
    failed_hash = notes.get(FAILED)
    wanted = _hash(manifest)
    rolled_back = None
    if stable and wanted == failed_hash and stable["metadata"]["annotations"][TEMPLATE_HASH] != wanted:
        manifest = _with_template(manifest, stable)
        rolled_back = f"template {wanted} failed its health gate; serving the last healthy one"
    current = _hash(manifest)
    nodes = (existing or {}).get("status", {}).get("desiredNumberScheduled", 0)
    views = [pod_view(p) for p in pods]
    limit = max_unavailable_count(max_unavailable, nodes)
    waves = [100] if rolled_back else waves
    plan = _plan(views, current, nodes, waves, limit, min_ready, timeout, notes.get(WAVE), now)
    failed = None
    if plan.state == "Failed" and auto_rollback and stable and stable["metadata"]["annotations"][
            TEMPLATE_HASH] != current:
        failed_hash = current
        rolled_back = f"{plan.message}: failed the health gate, rolled back to the last healthy template"
        manifest = _with_template(manifest, stable)
        current = _hash(manifest)
        plan = _plan(views, current, nodes, [100], limit, min_ready, timeout, None, now)
    elif plan.state == "Failed":
        failed = f"{plan.message}; rollout paused (autoRollback is off)"
    if plan.state == "Complete" and nodes > 0:
        stable = manifest["spec"]["template"]
    reached, started = _wave_record(notes.get(WAVE), current, plan.wave, now)
    annotations = {WAVE: f"{current}:{reached}:{started:.0f}"}
    if stable:
        annotations[STABLE] = json.dumps(stable, sort_keys=True, separators=(",", ":"))
    if failed_hash:
        annotations[FAILED] = failed_hash
    meta = {**manifest["metadata"], "annotations": {**manifest["metadata"].get("annotations", {}), **annotations}}
    progress = ("rolled back" if rolled_back else "paused" if failed
                else "complete" if plan.state == "Complete" else f"wave {plan.wave}/{len(waves)}")
    requeue = None if plan.state == "Complete" or failed else max(1.0, min(5.0, min_ready / 2 or 1.0))
    return Decision({**manifest, "metadata": meta}, () if failed else plan.delete, progress, rolled_back, failed,
                    requeue)


def _wave_record(stored: str | None, current: str, wave: int, now: float) -> tuple[int, float]:
    """(highest wave reached, when it started) for the current template. A wave falling back (a pod
    flapping) keeps the clock of the wave already reached, so flapping cannot dodge the timeout."""
    if stored:
        hash_, wave_s, ts = stored.split(":")
        if hash_ == current and wave <= int(wave_s):
            return int(wave_s), float(ts)
    return wave, now


def _plan(views: list[PodView], current: str, nodes: int, waves: list[int], limit: int, min_ready: float,
          timeout: float, stored: str | None, now: float) -> WavePlan:
    plan = plan_wave(views, current, nodes, waves, limit, min_ready, timeout, now, now)
    _, started = _wave_record(stored, current, plan.wave, now)
    return plan_wave(views, current, nodes, waves, limit, min_ready, timeout, started, now)
