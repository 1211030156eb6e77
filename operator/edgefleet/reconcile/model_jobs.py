"""The one pipeline of the Jobs the operator runs for an EdgeModel (compile, bench): level-based and non-blocking,
each reconcile looks at the Job and returns at once.

- no Job: its sealed report, if the store holds one (the Job ran and its TTL removed it), decides; a report there
  that does not verify is refused with a Warning event and the Job runs again. Else the kind may answer without a
  Job (a compile cache entry, a full slot); else the Job, the Secret of its report key and the ConfigMap of its
  inputs are applied.
- Job running: running (a Job watch event marks the EdgeModel dirty when it changes); its Secret and ConfigMap are
  made again where the operator stopped between the applies.
- Job finished: its report, sealed with the Job's key and bound to its name (``reports.read_report``), decides; a
  report that does not verify is refused (the kind says how). A failed Job without a report is failed; a complete
  one gets REPORT_GRACE_SECONDS before its report counts as missing.

Running Jobs of the same model (and class) with other inputs, an older generation, are deleted.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ..kube import ApiError, Kube
from ..render.compile_job import render_report_key, report_ref
from ..settings import Settings
from .reports import ReportRejected, job_key, read_report

log = logging.getLogger(__name__)
REPORT_GRACE_SECONDS = 120.0
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Outcome(Protocol[T_co]):
    """What a kind of Job makes of each state (status variants for compile, one variant for bench)."""

    def running(self) -> T_co: ...
    def report(self, report: dict[str, Any], ref: str) -> T_co: ...
    def rejected(self, ref: str, why: str) -> T_co: ...
    def failed(self, message: str) -> T_co: ...
    def missing(self, ref: str) -> T_co: ...


@dataclass(frozen=True)
class ModelJob(Generic[T]):
    """One Job for one model's request: its manifest, its inputs and how its outcomes read."""

    what: str  # "compile" or "benchmark": logs, events and messages
    manifest: dict[str, Any]
    inputs: Callable[[dict[str, Any]], dict[str, Any]]  # the inputs ConfigMap, owned by the applied Job
    same_model: dict[str, str]  # labels of this model's Jobs of this kind (and class): stale ones are deleted
    event_on: dict[str, Any]  # the object refusals are reported on (the EdgeModel)
    outcome: Outcome[T]
    before_start: Callable[[], T | None] = lambda: None  # an answer without a Job (cache, slots), else None
    refused: Callable[[ApiError], T | None] = lambda err: None  # the API server's refusal to start it, else raise

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


def follow(kube: Kube, settings: Settings, job: ModelJob[T], master: bytes) -> T:
    """The outcome of ``job`` now, starting it where needed; ``master`` is the operator's report key
    (``reports.master_key``), read once per reconcile by the caller."""
    name, ns, out = job.name, settings.namespace, job.outcome
    ref = report_ref(settings.artifact_store, name)
    _delete_stale(kube, ns, job)
    live = kube.find("Job", name, ns)
    if live is None:
        return _start(kube, settings, job, ref, master)
    state, message, finished = job_state(live)
    if state == "Running":
        if kube.find("ConfigMap", name, ns) is None:  # the operator stopped between the applies
            kube.create(render_report_key(live, job_key(master, name)))
            kube.apply(job.inputs(live))
        return out.running()
    try:
        report = read_report(settings, ref, job_key(master, name), name)
    except ReportRejected as err:
        return out.rejected(ref, str(err))
    if report is not None:
        return out.report(report, ref)
    if state == "Failed":
        return out.failed(message)
    if finished and _age(finished) < REPORT_GRACE_SECONDS:
        return out.running()
    return out.missing(ref)


_accounts_made: set[tuple[str, str]] = set()  # (namespace, name) this process made sure of


def _ensure_job_account(kube: Kube, settings: Settings) -> None:
    """The Jobs' ServiceAccount (settings.job_service_account): the identity their pushes to the store carry.
    Created without a token of its own; pods get a projected one for the store's audience only."""
    key = (settings.namespace, settings.job_service_account)
    if key in _accounts_made:
        return
    kube.create({"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
                 "metadata": {"name": key[1], "namespace": key[0],
                              "labels": {"app.kubernetes.io/managed-by": "edgefleet"}}})
    _accounts_made.add(key)


def _start(kube: Kube, settings: Settings, job: ModelJob[T], ref: str, master: bytes) -> T:
    name, ns = job.name, settings.namespace
    try:
        report = read_report(settings, ref, job_key(master, name), name)
    except ReportRejected as err:  # the Job runs again: its sealed report replaces the forgery
        kube.event(job.event_on, "ReportRejected", f"report {ref} refused ({err}); the {job.what} Job runs again",
                   "Warning")
        report = None
    if report is not None:  # finished earlier and removed by its TTL
        return job.outcome.report(report, ref)
    early = job.before_start()
    if early is not None:
        return early
    try:
        _ensure_job_account(kube, settings)
        live = kube.apply(job.manifest)
        kube.create(render_report_key(live, job_key(master, name)))
        kube.apply(job.inputs(live))
    except ApiError as err:
        answer = job.refused(err)
        if answer is None:
            raise
        return answer
    log.info("%s Job %s/%s started", job.what, ns, name)
    return job.outcome.running()


def _delete_stale(kube: Kube, ns: str, job: ModelJob[Any]) -> None:
    """Running Jobs of this model with other inputs (an older generation) are no longer wanted."""
    for other in kube.list("Job", ns, job.same_model):
        meta = other["metadata"]
        if meta["name"] != job.name and job_state(other)[0] == "Running" and not meta.get("deletionTimestamp"):
            log.info("deleting stale %s Job %s/%s", job.what, ns, meta["name"])
            kube.delete("Job", meta["name"], ns)


def model_event_ref(namespace: str, name: str, uid: str | None = None) -> dict[str, Any]:
    """The EdgeModel a Job's refusals are reported on (an event's involvedObject)."""
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
            "metadata": {"name": name, "namespace": namespace, "uid": uid}}


def job_state(job: dict[str, Any]) -> tuple[str, str, str | None]:
    """(Running | Complete | Failed, message, when it finished)."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond["type"] == "Complete":
            return "Complete", cond.get("message", ""), status.get("completionTime") or cond.get("lastTransitionTime")
        if cond["type"] == "Failed":
            message = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".rstrip(": ")
            return "Failed", message, cond.get("lastTransitionTime")
    return "Running", "", None


def _age(timestamp: str) -> float:
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.UTC) - then).total_seconds()
