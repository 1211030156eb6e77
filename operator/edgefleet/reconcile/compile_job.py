"""Compile executor ``job``: one Kubernetes Job per (model generation, inputs), results read back from the
artifact store. Level-based and non-blocking: each reconcile looks at the Job and returns at once.

- no Job: if its report is already in the store (the Job ran and its TTL removed it), use it; else apply the
  Job, the ConfigMap of its inputs and the Secret of its report key, and leave the variants Compiling.
- Job running: Compiling (a Job watch event marks the EdgeModel dirty when it changes).
- Job finished: the report pushed by ``edgefleet compile --report oci://...`` becomes the status variants.
  Every report is read through ``reports.read_report``: sealed with the Job's key and bound to its name, or
  refused (variants Failed, reason ReportRejected, a Warning event naming the tag).
  A failed Job without a report -> every variant Failed, reason CompileJobFailed, the Job's message.
  A complete Job without a report is given REPORT_GRACE_SECONDS before CompileReportMissing.

The Job's name is a pure function of its inputs (render/compile_job.py), so a restarted operator finds the
Job it started. Running Jobs of the same model with other inputs (an older generation) are deleted.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

from ..api import ConfigMapKeyRef, EdgeModel, HardwareProfileSpec
from ..api.compile import CompileRequest, Policy
from ..compiler import CompileError, VariantReport
from ..kube import Kube
from ..render.compile_job import (
    INPUTS_DIR,
    MODEL_NAME,
    MODEL_NAMESPACE,
    WATCH_LABELS,
    CompileJobRequest,
    compile_labels,
    content_key,
    content_report_ref,
    inputs_size,
    render_compile_inputs,
    render_compile_job,
    render_report_key,
    report_ref,
)
from ..settings import Settings
from .reports import (
    ReportRejected,
    cache_key,
    content_binding,
    job_key,
    master_key,
    read_report,
    seal_into_store,
)
from .sources import config_map_bytes, without_none
from .world import World

log = logging.getLogger(__name__)
REPORT_GRACE_SECONDS = 120.0
MAX_INPUTS_BYTES = 1_000_000  # a ConfigMap holds at most 1 MiB


def compile_in_job(kube: Kube, settings: Settings, em: EdgeModel, namespace: str, targets: list[str],
                   world: World) -> list[dict[str, Any]]:
    """Status variants for ``targets``: Compiling while the Job runs, else what its report says."""
    profiles = {p.metadata["name"]: p for p in world.profiles}
    try:
        req = job_request(kube, settings, em, namespace, {t: profiles[t].spec for t in targets})
    except CompileError as err:
        return [without_none(err.to_status_variant(t)) for t in targets]
    manifest = render_compile_job(req, settings)
    name, ns = manifest["metadata"]["name"], settings.namespace
    ref = report_ref(settings.artifact_store, name)
    master = master_key(kube, settings)
    sealed = Sealed(kube, settings, em, master, content_key(req, settings))
    _delete_stale(kube, ns, req, name)
    job = kube.find("Job", name, ns)
    if job is None:
        found = sealed.job_report(ref, name, targets, rerun=True)
        if found is not None:  # finished earlier and removed by its TTL
            return found
        found = sealed.cached(targets)
        if found is not None:  # the same compile, done earlier for another generation of this model
            log.info("EdgeModel %s/%s: compile of %s found in the store, no Job", namespace, req.model_name, targets)
            return found
        busy = _running_jobs(kube, ns, namespace)
        if len(busy) >= settings.compile_jobs_per_namespace:
            return _queued(targets, namespace, busy, settings.compile_jobs_per_namespace)
        job = kube.apply(manifest)
        kube.create(render_report_key(job, job_key(master, name)))
        kube.apply(render_compile_inputs(req, job))
        log.info("EdgeModel %s/%s: compile Job %s/%s started for %s", namespace, req.model_name, ns, name, targets)
        return _compiling(targets)
    state, message, finished = job_state(job)
    if state == "Running":
        if kube.find("ConfigMap", name, ns) is None:  # the operator stopped between the applies
            kube.create(render_report_key(job, job_key(master, name)))
            kube.apply(render_compile_inputs(req, job))
        return _compiling(targets)
    found = sealed.job_report(ref, name, targets)
    if found is not None:
        return found
    if state == "Failed":
        return [_failed(t, "CompileJobFailed", f"compile Job {ns}/{name} failed: {message}. Fix: read its "
                        f"logs (kubectl logs -n {ns} job/{name}) while it exists") for t in targets]
    if finished and _age(finished) < REPORT_GRACE_SECONDS:
        return _compiling(targets)  # retried by the next Job event or resync
    return [_failed(t, "CompileReportMissing", f"compile Job {ns}/{name} completed but its report {ref} is not in "
                    "the artifact store. Fix: check that the compiler image pushes --report and can reach the "
                    "registry") for t in targets]


class Sealed:
    """Reading a compile's reports for one model: the Job's own (sealed with its key) and the compile cache's
    (sealed by the operator); a report that does not verify is refused with a Warning event on the model."""

    def __init__(self, kube: Kube, settings: Settings, em: EdgeModel, master: bytes, content: str):
        self.kube, self.settings, self.em, self.master, self.content = kube, settings, em, master, content

    def job_report(self, ref: str, job: str, targets: list[str], rerun: bool = False) -> list[dict[str, Any]] | None:
        """Status variants from the Job's report; None when it is not there yet. With ``rerun`` (no Job exists), a
        report that does not verify is ignored with a Warning event and None is returned: the Job runs again and
        its sealed report replaces the forgery."""
        try:
            report = read_report(self.settings, ref, job_key(self.master, job), job)
        except ReportRejected as err:
            if rerun:
                self._event(ref, str(err), "ignored; the compile Job runs again")
                return None
            return self._rejected(ref, str(err), targets)
        if report is None:
            return None
        if _all_ready(report, targets) is not None:
            cache = content_report_ref(self.settings.artifact_store, self.content)
            seal_into_store(self.settings, cache, self.master, self.content, report)
        return _from_report(report, targets, ref)

    def cached(self, targets: list[str]) -> list[dict[str, Any]] | None:
        """Status variants from the compile cache when it holds this compile with every target Ready."""
        ref, binding = content_report_ref(self.settings.artifact_store, self.content), content_binding(self.content)
        try:
            report = _all_ready(read_report(self.settings, ref, cache_key(self.master, self.content), binding), targets)
        except ReportRejected as err:
            self._event(ref, str(err), "ignored; a compile Job runs instead")
            return None
        return None if report is None else _from_report(report, targets, ref)

    def _rejected(self, ref: str, why: str, targets: list[str]) -> list[dict[str, Any]]:
        """Failed variants naming the refusal (their Degraded condition posts the one Warning event)."""
        return [_failed(t, "ReportRejected", f"the compile report {ref} was refused: {why}. Something other than "
                        "this compile Job wrote it. Fix: allow pushes to the artifact store only with the "
                        "credentials of edgefleet's Jobs (docs/security.md), then change the EdgeModel's spec to "
                        "compile again") for t in targets]

    def _event(self, ref: str, why: str, outcome: str) -> None:
        obj = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": self.em.metadata}
        self.kube.event(obj, "ReportRejected", f"report {ref} refused ({why}); {outcome}", "Warning")


def job_request(kube: Kube, settings: Settings, em: EdgeModel, namespace: str,
                targets: dict[str, HardwareProfileSpec]) -> CompileJobRequest:
    """The Job's request; ConfigMap sources and data are copied (the Job runs in the operator's namespace)."""
    if not settings.artifact_store.startswith("oci://"):
        raise CompileError("InvalidRequest", f"the job compile executor needs an oci:// artifact store, not "
                           f"{settings.artifact_store!r}", "set EDGEFLEET_ARTIFACT_STORE (chart: artifactStore.url) "
                           "to oci://HOST/REPO, or use the inline executor")
    spec = em.spec
    files: dict[str, bytes] = {}
    names: dict[str, str | None] = {"source": None, "calibration": None, "evaluation": None}
    if spec.source.config_map is not None:
        names["source"] = _copy(kube, namespace, spec.source.config_map, "source", files)
    elif spec.source.uri and spec.source.uri.startswith("pvc://"):
        raise CompileError("SourceUnavailable", f"{spec.source.uri}: compile Jobs run in the operator's namespace "
                           f"{settings.namespace} and cannot mount a claim of namespace {namespace}",
                           "publish the model to oci:// (oras push) or https://, or put it in a ConfigMap")
    opt = spec.optimization
    for role in ("calibration", "evaluation"):
        ref = getattr(opt, role)
        if ref is None:
            continue
        if ref.config_map is None:
            raise CompileError("InvalidData", f"{role} data {ref.uri}: the compile Job reads data from ConfigMaps "
                               "only", f"put the {role} .npz in a ConfigMap (binaryData) and reference it")
        names[role] = _copy(kube, namespace, ref.config_map, role, files)
    policy = Policy.of(opt, _input(names["calibration"]), _input(names["evaluation"]), settings.compile_timing_runs,
                       settings.compile_host_latency_ms)
    source = str(_input(names["source"]) or spec.source.uri)
    req = CompileJobRequest(
        model_namespace=namespace, generation=em.metadata.get("generation") or 0,
        request=CompileRequest.of(em, targets, source, policy), files=files,
        encryption_public_key=spec.encryption.public_key if spec.encryption else None,
    )
    size = inputs_size(req)
    if size > MAX_INPUTS_BYTES:
        raise CompileError("InvalidRequest", f"the ConfigMap data the compile Job needs comes to {size} bytes "
                           "(base64); its inputs ConfigMap holds at most 1 MiB",
                           "publish the model with spec.source.uri (oci:// or https://)")
    return req


def _input(name: str | None) -> Path | None:
    """Where the Job finds an input file it was given (the inputs ConfigMap's mount)."""
    return Path(INPUTS_DIR) / name if name else None


def _copy(kube: Kube, namespace: str, ref: ConfigMapKeyRef, role: str, files: dict[str, bytes]) -> str:
    name = f"{role}-{Path(ref.key).name}"
    files[name] = config_map_bytes(kube, namespace, ref)
    return name


def _delete_stale(kube: Kube, ns: str, req: CompileJobRequest, keep: str) -> None:
    """Running compile Jobs of this model with other inputs (an older generation) are no longer wanted."""
    labels = compile_labels(req)
    for job in kube.list("Job", ns, {MODEL_NAMESPACE: labels[MODEL_NAMESPACE], MODEL_NAME: labels[MODEL_NAME]}):
        meta = job["metadata"]
        if meta["name"] != keep and job_state(job)[0] == "Running" and not meta.get("deletionTimestamp"):
            log.info("deleting stale compile Job %s/%s", ns, meta["name"])
            kube.delete("Job", meta["name"], ns)


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


def _all_ready(report: dict[str, Any] | None, targets: list[str]) -> dict[str, Any] | None:
    """A cached report worth reusing: every target Ready (a failure is retried by a Job of this model's own)."""
    variants = (report or {}).get("variants") or {}
    if report is None or "error" in report or any(variants.get(t, {}).get("state") != "Ready" for t in targets):
        return None
    return report


def _from_report(report: dict[str, Any], targets: list[str], ref: str) -> list[dict[str, Any]]:
    if "error" in report:
        e = report["error"]
        err = CompileError(e.get("reason", "CompileFailed"), e.get("message", ""), e.get("fix", ""))
        return [without_none(err.to_status_variant(t)) for t in targets]
    variants = report.get("variants") or {}
    out = []
    for t in sorted(targets):
        if t in variants:
            out.append(without_none(VariantReport.from_dict(variants[t]).to_status()))
        else:
            out.append(_failed(t, "CompileReportIncomplete", f"the compile report {ref} has no variant for {t}"))
    return out


def _running_jobs(kube: Kube, ns: str, model_namespace: str) -> list[str]:
    """The compile Jobs of ``model_namespace``'s models still running (their slots)."""
    jobs = kube.list("Job", ns, {**WATCH_LABELS, "app.kubernetes.io/component": "compile",
                                 MODEL_NAMESPACE: model_namespace})
    return sorted(j["metadata"]["name"] for j in jobs if job_state(j)[0] == "Running")


def _queued(targets: list[str], namespace: str, busy: list[str], slots: int) -> list[dict[str, Any]]:
    """Compiling, waiting for one of the namespace's compile slots (a Job event of a finishing Job retries)."""
    why = (f"queued: namespace {namespace} has {len(busy)} compile Jobs running ({', '.join(busy[:3])}), its limit "
           f"is {slots} (the operator's EDGEFLEET_COMPILE_JOBS_PER_NAMESPACE); this compile starts when one ends "
           "(at the next resync at the latest)")
    return [{"profile": t, "state": "Compiling", "reason": "CompileQueued", "message": why} for t in targets]


def _compiling(targets: list[str]) -> list[dict[str, Any]]:
    return [{"profile": t, "state": "Compiling"} for t in targets]  # the same entries reconcile writes first


def _failed(profile: str, reason: str, message: str) -> dict[str, Any]:
    return {"profile": profile, "state": "Failed", "reason": reason, "message": message}


def _age(timestamp: str) -> float:
    when = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.UTC) - when).total_seconds()
