"""Reconcile a FederatedTraining: read the world, apply the run's children, reflect the server's report.

Level-based: every call looks at the object, its Job and the report in the artifact store, and moves one
step. Terminal states (Succeeded, Failed for this generation) are left alone. Nothing is published from a
failed run: the server pushes a model only after all rounds passed the minimum and the result beat the start
and the gate, and the target EdgeModel's source changes only on a Succeeded report that names the digest.
"""

from __future__ import annotations

import logging
import secrets
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
from ..api.federated import CLIENTS_REFUSED, FAILED, SUCCEEDED, FederatedTraining, FederatedTrainingStatus
from ..compiler import CompileError
from ..federated_tls import make_bundle
from ..kube import ApiError, Kube
from ..render import federated as r
from ..render.compile_job import render_report_key
from ..render.tenancy import federated_refusal
from ..settings import Settings
from .conditions import flipped, set_condition
from .errors import as_permanent
from .reports import ReportRejected, job_key, master_key, read_report
from .sources import config_map_bytes, uri_bytes

log = logging.getLogger(__name__)
KIND = "FederatedTraining"
RELOOK_SECONDS = 5.0
MAX_INPUT_BYTES = 900_000  # a Secret holds at most 1 MiB, base64 aside
MAX_CLIENTS = 1000  # one certificate and one Secret each, all made in one step


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
    if len(clients) > MAX_CLIENTS:
        raise RunFailed("TooManyClients", f"the participants give {len(clients)} clients, over the {MAX_CLIENTS} "
                        "one run admits; narrow participants or lower clientsPerNode")
    with _refusal_fails_the_run(f"the Secrets, Service or Jobs of FederatedTraining {ns}/{ft.metadata['name']}",
                                "FederatedTraining"):
        admitted = _apply_children(kube, settings, ft, source, clients)
    status["clients"] = len(admitted)
    report = _report(kube, settings, ft)
    if report:
        status.update(_from_report(report))
        _note_refusals(status, ft.metadata.get("generation"))
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
    """The run's clients, once every participating node's class allows its host path and tolerations."""
    profiles = [HardwareProfile.model_validate(p) for p in kube.list("HardwareProfile")]
    nodes = kube.list("Node")
    names = set(participating_nodes(ft, nodes, profiles))
    classes = {n["metadata"]["name"]: best_profile(profiles, n["metadata"].get("labels") or {})
               for n in nodes if n["metadata"]["name"] in names}
    refused = federated_refusal(ft, classes)
    if refused is not None:
        raise RunFailed(refused.reason, f"{refused.message}. Fix: {refused.fix}")
    return [r.Client(n, i) for n in sorted(names) for i in range(ft.spec.participants.clients_per_node)]


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
                    clients: list[r.Client]) -> list[r.Client]:
    """The run's Secrets first (created once, never read: AlreadyExists means made), then the Service, the
    server Job and one Job per admitted client; returns the admitted clients. The server Job exists only after
    the Secrets were made, so a step that finds it skips them (and the reads of the model and evaluation data)
    and takes the admitted clients and the TLS Secrets' suffix from its annotations: the CA's key is gone, so
    a node that joins later gets no certificate and no client."""
    ns, run = ft.metadata["namespace"], r.run_name(ft)
    server = kube.find("Job", run, ns)
    if server is None:
        tls_id = secrets.token_hex(4)  # a failed step's Secrets (of another CA) are never mixed with these
        for secret in _run_secrets(kube, settings, ft, source, clients, tls_id):
            kube.create(secret)
        kube.apply(r.render_service(ft))
        server = kube.apply(r.render_server_job(ft, settings, clients[0].node, clients, tls_id))
        kube.create(render_report_key(server, job_key(master_key(kube, settings), r.report_binding(ft))))
    tls_id, admitted = r.admitted(server)
    service = kube.find("Service", run, ns) or kube.apply(r.render_service(ft))
    address = (service.get("spec") or {}).get("clusterIP", "")  # nodes without cluster DNS reach it too
    for c in admitted:
        if kube.find("Job", c.job_name(run), ns) is None:
            kube.apply(r.render_client_job(ft, settings, c, tls_id, address))
    return admitted


def _run_secrets(kube: Kube, settings: Settings, ft: FederatedTraining, source: EdgeModel, clients: list[r.Client],
                 tls_id: str) -> list[dict[str, Any]]:
    """The inputs Secret, the server's TLS Secret and one TLS Secret per client (each its own key)."""
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
    bundle = make_bundle(run, [host, run, f"{run}.{ns}", f"{host}.cluster.local"],
                         {c.job_name(run): c.node for c in clients})
    return ([r.render_secret(ft, model, evaluation),
             r.render_server_tls_secret(ft, tls_id, bundle.server_secret_data())]
            + [r.render_client_tls_secret(ft, c, tls_id, bundle.client_secret_data(c.job_name(run))) for c in clients])


def _report(kube: Kube, settings: Settings, ft: FederatedTraining) -> dict[str, Any] | None:
    """The server's report, sealed with the run's key for this FederatedTraining (reports.py); one that is not
    fails the run (nothing it says is acted on)."""
    # the same tag the server pushed, as the operator reaches it
    ref = r.report_ref(r.tenant_store(settings.artifact_store, settings, ft), ft)
    binding = r.report_binding(ft)
    try:
        return read_report(settings, ref, job_key(master_key(kube, settings), binding), binding)
    except ReportRejected as err:
        raise RunFailed("ReportRejected", f"the server report {ref} was refused ({err}): something other than "
                        "this run's server wrote it; restrict pushes to the artifact store (docs/security.md)") from err


def _from_report(report: dict[str, Any]) -> dict[str, Any]:
    rounds = [{k: v for k, v in {"round": x["round"], "clients": x["clients"], "failures": x.get("failures", 0),
                                 "refused": len(x.get("refused") or []), "loss": x.get("loss"),
                                 "accuracy": x.get("accuracy")}.items() if v is not None}
              for x in report.get("rounds", [])]
    out = {"rounds": rounds, "roundsDone": len(rounds), "refusedClients": _refused_clients(report)}
    for key in ("startAccuracy", "finalAccuracy"):
        if report.get(key) is not None:
            out[key] = report[key]
    pub = report.get("published") or {}
    if report.get("state") == "Succeeded" and pub.get("digest"):
        out.update(publishedRef=pub["ref"], publishedDigest=pub["digest"])
    return out


def _refused_clients(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's refusals, one entry per client: the latest reason, message and round, and how many."""
    by_client: dict[str, dict[str, Any]] = {}
    for x in report.get("refusedClients") or []:
        if not isinstance(x, dict) or not x.get("client"):
            continue
        client = str(x["client"])[:253]
        entry = {"client": client, "reason": str(x.get("reason") or "Refused")[:64],
                 "message": str(x.get("message") or "")[:1024],
                 "count": by_client.get(client, {}).get("count", 0) + 1}
        if isinstance(x.get("round"), int) and x["round"] >= 1:
            entry["round"] = x["round"]
        by_client[client] = entry
    return list(by_client.values())[:1000]


def _note_refusals(status: dict[str, Any], gen: int | None) -> None:
    """ClientsRefused: True, naming the refused clients, once the server refused any."""
    refused = status.get("refusedClients") or []
    if not refused:
        return
    names = "; ".join(f"{x['client']}: {x['reason']}" + (f" in round {x['round']}" if "round" in x else "")
                      for x in refused[:10])
    more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
    status["conditions"] = set_condition(
        status.get("conditions", []), CLIENTS_REFUSED, True, "UpdatesRefused",
        f"the server refused {len(refused)} client(s): {names}{more}; see status.refusedClients, and check "
        "those clients' nodes (kubectl logs on their Jobs)", gen)


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
    conds = set_condition(status.get("conditions", []), PROGRESSING, False, reason, message, gen)
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
            if c["status"] == "True" and c["type"] in (SUCCEEDED, FAILED, CLIENTS_REFUSED):
                kube.event(obj, c["reason"], c["message"], "Normal" if c["type"] == SUCCEEDED else "Warning")
    return status
