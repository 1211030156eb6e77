"""Compile executor ``job``: one Kubernetes Job per (model generation, inputs), followed through the model-Job
pipeline (``model_jobs``); what its states mean for the model's status variants is ``CompileOutcome``:

- Job running: Compiling. Before a Job starts: the compile cache (``compiled-<content key>``, sealed by the
  operator) may hold this compile, or the namespace has no free compile slot (Compiling, CompileQueued).
- Job finished: the sealed report pushed by ``edgefleet compile --report oci://...`` becomes the status variants;
  a report that does not verify fails them (ReportRejected, one Warning event naming the tag). A failed Job
  without a report -> CompileJobFailed; a complete one without -> CompileReportMissing after the grace.

The Job's name is a pure function of its inputs (render/compile_job.py), so a restarted operator finds the
Job it started.
"""

from __future__ import annotations

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
    training_note,
)
from ..settings import Settings
from .model_jobs import ModelJob, follow, job_state, model_event_ref
from .reports import ReportRejected, cache_key, content_binding, master_key, read_report, seal_into_store
from .sources import config_map_bytes, without_none
from .world import World

log = logging.getLogger(__name__)
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
    labels = compile_labels(req)
    master = master_key(kube, settings)
    outcome = CompileOutcome(settings, master, content_key(req, settings), targets, manifest["metadata"]["name"])
    outcome.training = training_note(req, manifest["metadata"]["name"], settings)
    job: ModelJob[list[dict[str, Any]]] = ModelJob(
        "compile", manifest, lambda live: render_compile_inputs(req, live),
        {MODEL_NAMESPACE: labels[MODEL_NAMESPACE], MODEL_NAME: labels[MODEL_NAME]}, _event_on(em), outcome,
        before_start=lambda: _without_job(kube, settings, em, namespace, outcome))
    return follow(kube, settings, job, master)


def _event_on(em: EdgeModel) -> dict[str, Any]:
    return model_event_ref(em.metadata["namespace"], em.metadata["name"], em.metadata.get("uid"))


def _without_job(kube: Kube, settings: Settings, em: EdgeModel, namespace: str, outcome: CompileOutcome
                 ) -> list[dict[str, Any]] | None:
    """Before a Job starts: the compile cache (the same compile, done for another generation of this model), then
    the namespace's compile slots; None: start the Job."""
    try:
        found = outcome.cached()
    except ReportRejected as err:
        kube.event(_event_on(em), "ReportRejected",
                   f"report {outcome.cache_ref} refused ({err}); ignored; a compile Job runs instead", "Warning")
        found = None
    if found is not None:
        log.info("EdgeModel %s/%s: compile of %s found in the store, no Job", namespace, em.metadata["name"],
                 outcome.targets)
        return found
    busy = _running_jobs(kube, settings.namespace, namespace)
    if len(busy) >= settings.compile_jobs_per_namespace:
        return _queued(outcome.targets, namespace, busy, settings.compile_jobs_per_namespace)
    return None


class CompileOutcome:
    """What a compile Job's states mean for the model's status variants. An accepted report with every target
    Ready is sealed again by the operator into the compile cache (``compiled-<content key>``)."""

    def __init__(self, settings: Settings, master: bytes, content: str, targets: list[str], job: str):
        self.settings, self.master, self.content, self.targets = settings, master, content, targets
        self.ns, self.name = settings.namespace, job
        self.job = f"{self.ns}/{job}"
        self.cache_ref = content_report_ref(settings.artifact_store, content)

    training: str | None = None  # what the running Job trains (render.compile_job.training_note)

    def running(self) -> list[dict[str, Any]]:
        if self.training:  # the variants say it while the Job runs; the Compiled condition repeats it
            return [{"profile": t, "state": "Compiling", "reason": "Training", "message": self.training}
                    for t in self.targets]
        return _compiling(self.targets)

    def report(self, report: dict[str, Any], ref: str) -> list[dict[str, Any]]:
        if _all_ready(report, self.targets) is not None:
            seal_into_store(self.settings, self.cache_ref, self.master, self.content, report)
        return _from_report(report, self.targets, ref)

    def cached(self) -> list[dict[str, Any]] | None:
        """Status variants from the compile cache when it holds this compile with every target Ready."""
        report = _all_ready(read_report(self.settings, self.cache_ref, cache_key(self.master, self.content),
                                        content_binding(self.content)), self.targets)
        return None if report is None else _from_report(report, self.targets, self.cache_ref)

    def rejected(self, ref: str, why: str) -> list[dict[str, Any]]:
        """Failed variants naming the refusal (their Degraded condition posts the one Warning event)."""
        return [_failed(t, "ReportRejected", f"the compile report {ref} was refused: {why}. Something other than "
                        "this compile Job wrote it. Fix: allow pushes to the artifact store only with the "
                        "credentials of edgefleet's Jobs (docs/security.md), then change the EdgeModel's spec to "
                        "compile again") for t in self.targets]

    def failed(self, message: str) -> list[dict[str, Any]]:
        return [_failed(t, "CompileJobFailed", f"compile Job {self.job} failed: {message}. Fix: read its logs "
                        f"(kubectl logs -n {self.ns} job/{self.name}) while it exists") for t in self.targets]

    def missing(self, ref: str) -> list[dict[str, Any]]:
        return [_failed(t, "CompileReportMissing", f"compile Job {self.job} completed but its report {ref} is not "
                        "in the artifact store. Fix: check that the compiler image pushes --report and can reach "
                        "the registry") for t in self.targets]


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
