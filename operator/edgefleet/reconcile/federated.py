"""Reconcile a FederatedTraining: read the world, apply the run's children, reflect the server's report.

Level-based: every call looks at the object, its Job and the report in the artifact store, and moves one
step. Terminal states (Succeeded, Failed for this generation) are left alone. Nothing is published from a
failed run: the server pushes a model only after all rounds passed the minimum and the result beat the start
and the gate, and the target EdgeModel's source changes only on a Succeeded report that names the digest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError

from ..api import (
    PROGRESSING,
    DataRef,
    EdgeModel,
    HardwareProfile,
    Source,
    best_profile,
    format_errors,
    label_selector_matches,
)
from ..api.federated import FAILED, SUCCEEDED, FederatedTraining, FederatedTrainingStatus
from ..artifacts import StoreError, own_store
from ..compiler import CompileError
from ..federated_tls import make_bundle
from ..kube import ApiError, Kube
from ..render import federated as r
from ..settings import Settings
from .conditions import flipped, set_condition
from .errors import as_permanent
from .sources import config_map_bytes, uri_bytes

log = logging.getLogger(__name__)
KIND = "FederatedTraining"
RELOOK_SECONDS = 5.0
MAX_INPUT_BYTES = 900_000  # a Secret holds at most 1 MiB, TLS keys and base64 aside


class RunFailed(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def reconcile_federated(kube: Kube, settings: Settings, obj: dict[str, Any]) -> dict[str, Any]:
    """One step of the run; returns the status written."""
    meta = obj["metadata"]
    old = obj.get("status") or {}
    gen = meta.get("generation")
    if _terminal(old, gen):
        return old
    try:
        ft = FederatedTraining.model_validate(obj)
    except ValueError as err:  # the CRD's schema and CEL rules catch most of it first
        lines = format_errors(err) if isinstance(err, ValidationError) else [str(err)]
        return _finish(kube, obj, old, FAILED, "InvalidSpec", "; ".join(lines), gen)
    status = dict(old)
    try:
        status = _step(kube, settings, ft, status)
    except RunFailed as err:  # `status` holds what the step read before (the report's rounds)
        _stop_clients(kube, ft)
        return _finish(kube, obj, old, FAILED, err.reason, err.message, gen, status)
    return _write(kube, obj, old, status, gen)


def reconcile_federated_by_name(kube: Kube, settings: Settings, namespace: str, name: str) -> float | None:
    """The operator's entry: one step of the named run; seconds until the next look while it trains (the
    server's report is in the artifact store, which nobody watches), None once it is terminal or gone."""
    obj = kube.find(KIND, name, namespace)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return None
    status = reconcile_federated(kube, settings, obj)
    return None if _terminal(status, obj["metadata"].get("generation")) else RELOOK_SECONDS


def _terminal(status: dict[str, Any], gen: int | None) -> bool:
    return any(c["type"] in (SUCCEEDED, FAILED) and c["status"] == "True" and c.get("observedGeneration") == gen
               for c in status.get("conditions", []))


def _step(kube: Kube, settings: Settings, ft: FederatedTraining, status: dict[str, Any]) -> dict[str, Any]:
    ns = ft.metadata["namespace"]
    source = _model(kube, ns, ft.spec.source_model.name, "spec.sourceModel.name")
    target = _model(kube, ns, ft.spec.target_model.name, "spec.targetModel.name")
    clients = _clients(kube, ft)
    if len(clients) < ft.spec.min_clients:
        raise RunFailed("NotEnoughClients", f"spec.minClients is {ft.spec.min_clients} but the participants give "
                        f"{len(clients)} clients ({len({c.node for c in clients})} nodes x clientsPerNode "
                        f"{ft.spec.participants.clients_per_node}); lower minClients or widen participants")
    with _refusal_fails_the_run(f"the Secret, Service or Jobs of FederatedTraining {ns}/{ft.metadata['name']}",
                                "FederatedTraining"):
        _apply_children(kube, settings, ft, source, clients)
    status["clients"] = len(clients)
    report = _report(settings, ft)
    if report:
        status.update(_from_report(report))
    job = kube.find("Job", r.run_name(ft), ns) or {}
    state = _job_state(job)
    if report and report.get("state") == "Failed":
        raise RunFailed(report.get("reason", "RoundFailed"), report.get("message", "the server reported a failure"))
    if state == "Failed":
        raise RunFailed("ServerFailed", f"server Job {ns}/{r.run_name(ft)} failed before reporting a result; "
                        f"read kubectl logs -n {ns} job/{r.run_name(ft)}")
    if report and report.get("state") == "Succeeded" and state == "Complete":
        published = report.get("published") or {}
        if not published.get("digest"):
            raise RunFailed("NotPublished", "the server finished without publishing a model (no artifact store)")
        with _refusal_fails_the_run(f"the publish to EdgeModel {ns}/{ft.spec.target_model.name}",
                                    "target EdgeModel (spec.targetModel)"):
            _publish(kube, target, published)
        _stop_clients(kube, ft)
        status["conditions"] = set_condition(status.get("conditions", []), PROGRESSING, False, "Finished",
                                             report.get("message", ""), ft.metadata.get("generation"))
        status["conditions"] = set_condition(
            status["conditions"], SUCCEEDED, True, "Published",
            f"{report.get('message', '')}; EdgeModel {ft.spec.target_model.name} now points at "
            f"{published['ref']}", ft.metadata.get("generation"))
        return status
    done = len(status.get("rounds", []))
    status["conditions"] = set_condition(status.get("conditions", []), PROGRESSING, True, "Training",
                                         f"{done}/{ft.spec.rounds} rounds done with {len(clients)} clients",
                                         ft.metadata.get("generation"))
    return status


@contextmanager
def _refusal_fails_the_run(what: str, subject: str) -> Iterator[None]:
    """An API refusal that no retry gets past (a 4xx such as 403 or 422) fails the run with the reason and the fix,
    instead of being retried forever; anything else propagates and the controller retries it."""
    try:
        yield
    except ApiError as err:
        problem = as_permanent(err, what, subject)
        if problem is None:
            raise
        raise RunFailed(problem.reason, f"{problem}; then change the FederatedTraining's spec to try "
                        "again (a run stays Failed for its generation)") from err


def _model(kube: Kube, ns: str, name: str, field: str) -> EdgeModel:
    obj = kube.find("EdgeModel", name, ns)
    if obj is None:
        raise RunFailed("ModelNotFound", f"{field}: EdgeModel {ns}/{name} not found; create it or fix the name")
    return EdgeModel.model_validate(obj)


def participating_nodes(ft: FederatedTraining, nodes: list[dict[str, Any]],
                        profiles: list[HardwareProfile]) -> list[str]:
    """Nodes matching the nodeSelector (when set) and belonging to one of hardwareClasses (when set), by name."""
    p = ft.spec.participants
    out = []
    for n in nodes:
        node_labels = n["metadata"].get("labels") or {}
        if p.node_selector is not None and not label_selector_matches(p.node_selector, node_labels):
            continue
        if p.hardware_classes:
            prof = best_profile(profiles, node_labels)
            if prof is None or prof.metadata.get("name") not in p.hardware_classes:
                continue
        out.append(n["metadata"]["name"])
    return sorted(out)


def _clients(kube: Kube, ft: FederatedTraining) -> list[r.Client]:
    profiles = [HardwareProfile.model_validate(p) for p in kube.list("HardwareProfile")]
    nodes = participating_nodes(ft, kube.list("Node"), profiles)
    return [r.Client(n, i) for n in nodes for i in range(ft.spec.participants.clients_per_node)]


def _bytes_of(kube: Kube, settings: Settings, ns: str, ref: Source | DataRef, what: str) -> bytes:
    """A ConfigMap key of the namespace, or a URI read anonymously within the limits (sources.uri_bytes)."""
    if ref.config_map is not None:
        return config_map_bytes(kube, ns, ref.config_map)
    uri = ref.uri or ""  # admission: exactly one of uri and configMap
    try:
        return uri_bytes(settings, uri, what, getattr(ref, "digest", None) or "", MAX_INPUT_BYTES)
    except CompileError as err:
        reason = "InputLimitExceeded" if err.reason == "SourceLimitExceeded" else "InputUnavailable"
        raise RunFailed(reason, f"{err.message}. Fix: {err.fix}") from err


def _apply_children(kube: Kube, settings: Settings, ft: FederatedTraining, source: EdgeModel,
                    clients: list[r.Client]) -> None:
    """The run's Secret first (created once, never read: AlreadyExists means made), then the Service, the
    server Job and one Job per client. The server Job exists only after the Secret was made, so a step that
    finds it skips the Secret (and the reads of the model and evaluation data)."""
    ns, run = ft.metadata["namespace"], r.run_name(ft)
    if kube.find("Job", run, ns) is None:
        kube.create(_run_secret(kube, settings, ft, source))
        kube.apply(r.render_service(ft))
        kube.apply(r.render_server_job(ft, settings, clients[0].node, len(clients)))
    service = kube.find("Service", run, ns) or kube.apply(r.render_service(ft))
    address = (service.get("spec") or {}).get("clusterIP", "")  # nodes without cluster DNS reach it too
    for c in clients:
        if kube.find("Job", c.job_name(run), ns) is None:
            kube.apply(r.render_client_job(ft, settings, c, address))


def _run_secret(kube: Kube, settings: Settings, ft: FederatedTraining, source: EdgeModel) -> dict[str, Any]:
    ns, run = ft.metadata["namespace"], r.run_name(ft)
    try:
        model = _bytes_of(kube, settings, ns, source.spec.source, "the source EdgeModel's spec.source")
        evaluation = _bytes_of(kube, settings, ns, ft.spec.evaluation.data, "spec.evaluation.data")
    except RunFailed:
        raise
    except Exception as err:  # CompileError from config_map_bytes
        raise RunFailed("InputUnavailable", str(getattr(err, "message", err))) from err
    if len(model) + len(evaluation) > MAX_INPUT_BYTES:
        size = len(model) + len(evaluation)
        raise RunFailed("InputsTooLarge", f"the source model and spec.evaluation.data are {size} "
                        f"bytes together, over the {MAX_INPUT_BYTES} one Secret holds; use a smaller evaluation set")
    host = r.server_host(ft)
    bundle = make_bundle(run, [host, run, f"{run}.{ns}", f"{host}.cluster.local"])
    return r.render_secret(ft, bundle.secret_data(), model, evaluation)


def _report(settings: Settings, ft: FederatedTraining) -> dict[str, Any] | None:
    ref = r.report_ref(settings.artifact_store, ft)  # the same tag the server pushed, as the operator reaches it
    try:
        store = own_store(settings.artifact_store, ref, settings.artifact_insecure, settings.artifact_username,
                          settings.artifact_password)
        report: dict[str, Any] = json.loads(store.get(ref, ""))
        return report
    except (StoreError, ValueError) as err:
        log.debug("federated report %s not available: %s", ref, err)
        return None


def _from_report(report: dict[str, Any]) -> dict[str, Any]:
    rounds = [{k: v for k, v in {"round": x["round"], "clients": x["clients"], "failures": x.get("failures", 0),
                                 "loss": x.get("loss"), "accuracy": x.get("accuracy")}.items() if v is not None}
              for x in report.get("rounds", [])]
    out = {"rounds": rounds, "roundsDone": len(rounds)}
    for key in ("startAccuracy", "finalAccuracy"):
        if report.get(key) is not None:
            out[key] = report[key]
    pub = report.get("published") or {}
    if report.get("state") == "Succeeded" and pub.get("digest"):
        out.update(publishedRef=pub["ref"], publishedDigest=pub["digest"])
    return out


def _job_state(job: dict[str, Any]) -> str:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return str(c["type"])
    return "Running" if job else "Absent"


def _publish(kube: Kube, target: EdgeModel, published: dict[str, Any]) -> None:
    """The target EdgeModel's source becomes the published model (digest-pinned); compile and rollout follow."""
    source = {"uri": published["ref"], "digest": published["digest"]}
    if target.spec.source.to_dict() == source:
        return
    meta = target.metadata
    # a merge patch, so the user's configMap source is dropped (an apply would keep it: two sources, refused)
    kube.patch("EdgeModel", meta["name"], meta["namespace"], {"spec": {"source": {**source, "configMap": None}}})


def _stop_clients(kube: Kube, ft: FederatedTraining) -> None:
    for job in kube.list("Job", ft.metadata["namespace"], {r.RUN: r.labels(ft, "client")[r.RUN],
                                                           "app.kubernetes.io/component": "client"}):
        kube.delete("Job", job["metadata"]["name"], ft.metadata["namespace"])


def _finish(kube: Kube, obj: dict[str, Any], old: dict[str, Any], kind: str, reason: str, message: str,
            gen: int | None, seen: dict[str, Any] | None = None) -> dict[str, Any]:
    """The terminal status: `seen` (the fields read this step, else the old status) with the condition."""
    status = dict(seen if seen is not None else old)
    conds = set_condition(old.get("conditions", []), PROGRESSING, False, reason, message, gen)
    status["conditions"] = set_condition(conds, kind, True, reason, message, gen)
    status.pop("publishedRef", None)
    status.pop("publishedDigest", None)
    return _write(kube, obj, old, status, gen)


def _write(kube: Kube, obj: dict[str, Any], old: dict[str, Any], status: dict[str, Any], gen: int | None
           ) -> dict[str, Any]:
    status["observedGeneration"] = gen
    status = FederatedTrainingStatus.model_validate(status).model_dump(mode="json", by_alias=True, exclude_none=True)
    if status != old:
        meta = obj["metadata"]
        kube.patch_status(KIND, meta["name"], meta["namespace"], status)
        for c in flipped(old.get("conditions", []), status.get("conditions", [])):
            if c["status"] == "True" and c["type"] in (SUCCEEDED, FAILED):
                kube.event(obj, c["reason"], c["message"], "Warning" if c["type"] == FAILED else "Normal")
    return status
