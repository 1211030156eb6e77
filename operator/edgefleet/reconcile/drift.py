"""The Drifting condition of an EdgeDeployment with spec.monitoring.drift.

Each runtime pod compares its last `windowSize` predictions with its reference (the served variant's answers on
the EdgeModel's evaluation data) and exports the PSI per statistic on /metrics (edgefleet_runtime_drift_psi,
edgefleet_runtime_drift_window_samples). The operator reads those two metrics from at most `maxPodsPerClass`
Ready pods per hardware class, over the pod network, once per `intervalSeconds`, and only for deployments with
drift on: nothing is read, listed or scheduled for the others. A Prometheus that already scrapes the pods gives
the same numbers to dashboards and alerts (the chart's PrometheusRule); the condition needs no Prometheus.

A pod is the user's: its /metrics may redirect, answer slowly or never stop. One scrape follows no redirect,
reads at most SCRAPE_LIMITS.max_bytes and ends at its deadline; one read of a deployment's pods ends at
READ_DEADLINE_SECONDS, so a slow endpoint holds the reconcile of its own deployment for at most that long.
Errors name the limit or the cause and never quote the response.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from edgefleet_runtime import bounded
from prometheus_client.parser import text_string_to_metric_families

from ..api import EdgeDeployment
from ..api.models import DriftMonitoring

# per pod: no redirects, 4 MiB (a runtime's /metrics is a few KiB), 2 s for everything
SCRAPE_LIMITS = bounded.Limits(max_bytes=4 << 20, deadline_seconds=2.0, max_redirects=0, connect_seconds=2.0,
                               read_seconds=2.0)
READ_DEADLINE_SECONDS = 5.0  # all pods of one deployment together
WORKERS = 8  # pods read at once
PROFILE_LABEL = "edgefleet.io/profile"
T = TypeVar("T")


@dataclass
class PodDrift:
    """What one pod's /metrics said (or why it could not be read)."""

    pod: str
    node: str
    psi: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    error: str | None = None


def scrape(ip: str, port: int) -> str:
    """A pod's /metrics text within SCRAPE_LIMITS; bounded.LimitExceeded or HTTPStatusError otherwise."""
    host = f"[{ip}]" if ":" in ip else ip
    url = f"http://{host}:{port}/metrics"
    return b"".join(bounded.get(url, SCRAPE_LIMITS, allow_plain_http=True)).decode("utf-8", "replace")


def why(error: Exception) -> str:
    """What went wrong with a scrape, without a word of the response: the limit, the status or the cause."""
    if isinstance(error, (bounded.LimitExceeded, bounded.HTTPStatusError)):
        return str(error)
    if isinstance(error, NotMetrics):
        return "the answer is not Prometheus text"
    text = str(error)
    at = text.find("[Errno")  # requests/urllib3 wrap the OS error in their own words: keep only the cause
    cause = text[at:].split("'")[0].split('"')[0].rstrip(")") if at >= 0 else ""
    return f"{type(error).__name__}: {cause}" if cause else type(error).__name__


class NotMetrics(ValueError):
    """The answer did not parse as Prometheus text (the parser's message would quote it)."""


def parse(text: str) -> tuple[dict[str, float], int]:
    """(PSI by statistic, predictions in the window) of a runtime's /metrics text."""
    psi, samples = {}, 0
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "edgefleet_runtime_drift_psi":
                    psi[s.labels.get("statistic", "")] = s.value
                elif s.name == "edgefleet_runtime_drift_window_samples":
                    samples = int(s.value)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise NotMetrics() from e
    return psi, samples


def ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return bool(pod.get("status", {}).get("podIP")) and not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conds)


def drift_of(ed: EdgeDeployment) -> DriftMonitoring:
    """spec.monitoring.drift; ValueError when drift is off (callers look only then)."""
    if ed.spec.monitoring is None or ed.spec.monitoring.drift is None:
        raise ValueError(f"EdgeDeployment {ed.metadata.get('name')} has no spec.monitoring.drift")
    return ed.spec.monitoring.drift


def read_pods(pods: list[dict[str, Any]], ed: EdgeDeployment, fetch: Callable[[str, int], str] | None = None
              ) -> dict[str, list[PodDrift]]:
    """Per hardware class, the drift of its first `maxPodsPerClass` Ready pods (by name), read concurrently."""
    fetch = fetch or scrape
    limit = drift_of(ed).max_pods_per_class
    by_class: dict[str, list[dict[str, Any]]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        profile = pod["metadata"].get("labels", {}).get(PROFILE_LABEL)
        if profile and ready(pod) and len(by_class.setdefault(profile, [])) < limit:
            by_class[profile].append(pod)

    def one(pod: dict[str, Any]) -> PodDrift:
        d = PodDrift(pod["metadata"]["name"], pod["spec"].get("nodeName", ""))
        try:
            d.psi, d.samples = parse(fetch(pod["status"]["podIP"], ed.spec.runtime.port))
        except Exception as e:  # unreachable, refused, over a limit, not a runtime: reported in the condition
            d.error = why(e)[:200]
        return d

    todo = [p for group in by_class.values() for p in group]
    read = _all(one, todo)
    return {c: [read[p["metadata"]["name"]] for p in group] for c, group in by_class.items()}


def _all(one: Callable[[dict[str, Any]], PodDrift], pods: list[dict[str, Any]]) -> dict[str, PodDrift]:
    return read_all(one, pods, lambda pod, error: PodDrift(pod["metadata"]["name"], pod["spec"].get("nodeName", ""),
                                                          error=error), "drift read")


def read_all(one: Callable[[dict[str, Any]], T], pods: list[dict[str, Any]],
             unread: Callable[[dict[str, Any], str], T], what: str) -> dict[str, T]:
    """``one(pod)`` for every pod, WORKERS at once, ending at READ_DEADLINE_SECONDS: a pod not read by then is
    ``unread(pod, why)`` (its scrape ends at its own deadline, after this returns). Keyed by pod name."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(pods))))
    futures = {p["metadata"]["name"]: pool.submit(one, p) for p in pods}
    wait(futures.values(), timeout=READ_DEADLINE_SECONDS)
    pool.shutdown(wait=False, cancel_futures=True)
    read = {}
    for pod in pods:
        name, future = pod["metadata"]["name"], futures[pod["metadata"]["name"]]
        read[name] = future.result() if future.done() and not future.cancelled() else unread(
            pod, f"not read within the {what}'s deadline of {READ_DEADLINE_SECONDS:g} s")
    return read


Verdict = tuple[bool | None, str, str]  # the Drifting condition: status (None: Unknown), reason, message


class Throttle:
    """At most one read per deployment per intervalSeconds, whatever else makes it reconcile (child events, a
    resync); a spec change (new generation) reads at once. In memory: a restarted operator reads once more."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 interval: Callable[[EdgeDeployment], float] | None = None):
        self.clock = clock
        self.interval = interval or (lambda ed: drift_of(ed).interval_seconds)
        self._last: dict[tuple[str, str], tuple[float, int | None, Any]] = {}

    def read(self, ed: EdgeDeployment, compute: Callable[[], T]) -> T:
        key = (ed.metadata["namespace"], ed.metadata["name"])
        generation = ed.metadata.get("generation")
        now = self.clock()
        last = self._last.get(key)
        if last and last[1] == generation and now - last[0] < self.interval(ed):
            return cast(T, last[2])
        result = compute()
        self._last[key] = (now, generation, result)
        return result

    def forget(self, namespace: str, name: str) -> None:
        self._last.pop((namespace, name), None)


THROTTLE = Throttle()


def verdict(ed: EdgeDeployment, per_class: dict[str, list[PodDrift]], classes: list[str],
            missing_data: str | None) -> tuple[bool | None, str, str]:
    """(status, reason, message) of Drifting: True when a class's full window reaches the threshold for some
    statistic; None (Unknown) while no class can tell."""
    if missing_data:
        return None, "EvaluationDataMissing", missing_data
    drift = drift_of(ed)
    drifted: list[str] = []
    fine: list[str] = []
    waiting: list[str] = []
    for klass in sorted(classes):
        pods = per_class.get(klass, [])
        full = [p for p in pods if not p.error and p.samples >= drift.window_size and p.psi]
        if not full:
            waiting.append(f"{klass}: {_waiting(pods, drift.window_size)}")
            continue
        worst = max(full, key=lambda p: max(p.psi.values()))
        over = {k: v for k, v in sorted(worst.psi.items()) if v >= drift.threshold}
        hits = sum(1 for p in full if max(p.psi.values()) >= drift.threshold)
        stats = ", ".join(f"{k} PSI {v:.2f}" for k, v in sorted(worst.psi.items()))
        if over:
            drifted.append(f"{klass}: " + ", ".join(f"{k} PSI {v:.2f} >= {drift.threshold:g}" for k, v in over.items())
                           + f" on {hits}/{len(full)} pods (worst {worst.pod} on {worst.node}; last {drift.window_size}"
                           " predictions against the evaluation data)")
        else:
            fine.append(f"{klass}: {stats} < {drift.threshold:g} on {len(full)} pods")
    if drifted:
        return True, "DistributionShift", "; ".join(drifted + fine + waiting) + (
            ". Look at the inputs (edgefleet examples pull), then retrain or recalibrate on recent data")
    if fine:
        return False, "WithinThreshold", "; ".join(fine + waiting)
    return None, "NotEnoughData", "; ".join(waiting) or "no hardware class serves this deployment yet"


def _waiting(pods: list[PodDrift], window: int) -> str:
    if not pods:
        return "no Ready pod to read"
    errors = [p for p in pods if p.error]
    if len(errors) == len(pods):
        return f"metrics of {len(pods)} pods unreadable ({errors[0].pod}: {errors[0].error})"
    most = max(p.samples for p in pods if not p.error)
    return f"{most}/{window} predictions in the fullest window"


def missing_evaluation(model: dict[str, Any] | None, name: str) -> str | None:
    """Why the runtime gets no drift reference (None: the evaluation data is a configMap it can mount)."""
    evaluation = ((model or {}).get("spec", {}).get("optimization") or {}).get("evaluation")
    if evaluation and evaluation.get("configMap"):
        return None
    where = "is a uri, which the runtime does not mount" if evaluation else "is not set"
    return (f"spec.monitoring.drift compares live traffic with the evaluation data, and EdgeModel {name}'s "
            f"spec.optimization.evaluation {where}; give it as a configMap (an .npz keyed by input name) or remove"
            " spec.monitoring.drift")
