"""Pure manifests of one FederatedTraining run: the run's inputs Secret (source model, evaluation data), a TLS
Secret for the server and one per client, the server Job and its Service, and one client Job per
(participating node, shard index). The keys are made by the reconciler (random); here they are only rendered
and mounted. Each pod mounts only its own TLS Secret, so a node (whose kubelet may read the Secrets of its
pods, and only those) never holds the server's key or another client's.

The server is a Job, not a Deployment: a run ends, and the Job's completion (exit 0 = published, 1 = failed)
is what the reconciler reads, beside the JSON report the server pushes to the artifact store every round.
Clients are Jobs of one pod that is never replaced (backoffLimit 0): a client that dies stays gone, and the
server's rounds go on with the rest when the minimum allows.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..api.federated import FederatedTraining
from ..settings import Settings
from .compile_job import report_key_secret, with_report_key
from .workload import restricted_security_context, with_registry_token

MANAGED_BY = "edgefleet"
NAME = "edgefleet-federated"
RUN = "edgefleet.io/federated-training"
PORT = 9092
UID = 10001
INPUTS_DIR = "/var/run/edgefleet/inputs"
TLS_DIR = "/var/run/edgefleet/tls"
DATA_DIR = "/var/lib/edgefleet/federated-data"
MODEL_FILE, EVAL_FILE = "model.onnx", "eval.npz"
TLS_ID = "edgefleet.io/tls-id"  # server Job annotation: the suffix of the run's TLS Secrets' names
CLIENTS = "edgefleet.io/clients"  # server Job annotation: the admitted clients, [[node, index], ...]
SERVER_EXIT_NO_RETRY = [1, 2]  # 1 = the run failed (report says why), 2 = bad input: neither gets better by retrying


@dataclass(frozen=True)
class Client:
    node: str
    index: int

    def job_name(self, run: str) -> str:
        """At most 63 characters (the Job's pods carry it as a label): run (40) + -c- + node (14) + -index."""
        return f"{run}-c-{_short(self.node, 14)}-{self.index}"

    def tls_secret(self, run: str, tls_id: str) -> str:
        return f"{self.job_name(run)}-tls-{tls_id}"


def _short(value: str, size: int = 30) -> str:
    v = value.replace(".", "-").lower()
    if len(v) <= size:
        return v
    return f"{v[:size - 9].rstrip('-')}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def run_name(ft: FederatedTraining) -> str:
    """The run's children are named `fl-<name>` (a DNS label, at most 40 characters)."""
    return f"fl-{_short(ft.metadata['name'], 37)}"


def secret_name(ft: FederatedTraining) -> str:
    return f"{run_name(ft)}-run"


def server_host(ft: FederatedTraining) -> str:
    return f"{run_name(ft)}.{ft.metadata['namespace']}.svc"


def report_ref(store: str, ft: FederatedTraining) -> str:
    """Where the server pushes its report: the artifact store's repository, tag `<run>-<uid8>-report`."""
    uid = ft.metadata.get("uid", "")[:8]
    return f"{store.rstrip('/')}:{run_name(ft)}-{uid}-report"


def pod_store(settings: Settings) -> str:
    """The artifact store as the run's pods reach it (trainer_artifact_store, else the operator's own)."""
    return settings.trainer_artifact_store or settings.artifact_store


def tenant_store(store: str, settings: Settings, ft: FederatedTraining) -> str:
    """Where the run's pods push: ``store``'s registry, repository ``<tenant_repository>/<namespace>`` (the
    namespace's ServiceAccount tokens may push there and nowhere else); a local ``store`` as it is."""
    if not store.startswith("oci://"):
        return store
    registry = store[len("oci://"):].split("/", 1)[0]
    return f"oci://{registry}/{settings.tenant_repository.strip('/')}/{ft.metadata['namespace']}"


def labels(ft: FederatedTraining, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": NAME, "app.kubernetes.io/managed-by": MANAGED_BY,
            "app.kubernetes.io/component": component, "app.kubernetes.io/instance": _short(ft.metadata["name"], 63),
            RUN: _short(ft.metadata["name"], 63)}


def _owner(ft: FederatedTraining) -> list[dict[str, Any]]:
    return [{"apiVersion": ft.api_version, "kind": "FederatedTraining", "name": ft.metadata["name"],
             "uid": ft.metadata["uid"], "controller": True, "blockOwnerDeletion": True}]


def _meta(ft: FederatedTraining, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": ft.metadata["namespace"], "labels": labels(ft, component),
            "ownerReferences": _owner(ft)}


def server_tls_secret(ft: FederatedTraining, tls_id: str) -> str:
    return f"{run_name(ft)}-server-tls-{tls_id}"


def _secret(ft: FederatedTraining, name: str, component: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(ft, name, component),
            "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())}}


def render_secret(ft: FederatedTraining, model: bytes, evaluation: bytes) -> dict[str, Any]:
    """The run's inputs (model.onnx, eval.npz). Like the TLS Secrets, it is created once and never read back
    (the operator may create Secrets in the run's namespace, not read them); the run owns it."""
    return _secret(ft, secret_name(ft), "run", {MODEL_FILE: model, EVAL_FILE: evaluation})


def render_server_tls_secret(ft: FederatedTraining, tls_id: str, data: dict[str, bytes]) -> dict[str, Any]:
    """ca.crt, server.crt, server.key: mounted by the server pod only."""
    return _secret(ft, server_tls_secret(ft, tls_id), "server", data)


def render_client_tls_secret(ft: FederatedTraining, client: Client, tls_id: str, data: dict[str, bytes]
                             ) -> dict[str, Any]:
    """ca.crt, client.crt, client.key of one client: mounted by that client's pod only."""
    return _secret(ft, client.tls_secret(run_name(ft), tls_id), "client", data)


def render_service(ft: FederatedTraining) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(ft, run_name(ft), "server"),
            "spec": {"selector": {RUN: _short(ft.metadata["name"], 63), "app.kubernetes.io/component": "server"},
                     "ports": [{"name": "flower", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]}}


def _secret_volume(name: str, secret: str, keys: list[str]) -> dict[str, Any]:
    items = [{"key": k, "path": k} for k in keys]
    return {"name": name, "secret": {"secretName": secret, "items": items, "defaultMode": 0o440}}


def _pod_spec(ft: FederatedTraining, node: str, container: dict[str, Any], volumes: list[dict[str, Any]],
              restart: str) -> dict[str, Any]:
    return {"restartPolicy": restart, "automountServiceAccountToken": False, "enableServiceLinks": False,
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [t.to_dict() for t in ft.spec.participants.tolerations],
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": 5, "containers": [container], "volumes": volumes}


RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "768Mi"}}


def _container(settings: Settings, args: list[str], mounts: list[dict[str, Any]], env: list[dict[str,
               Any]] | None = None) -> dict[str, Any]:
    return {"name": "trainer", "image": settings.trainer_image, "command": ["edgefleet-federated"], "args": args,
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}] + (env or []),
            "resources": RESOURCES, "securityContext": restricted_security_context(UID),
            "terminationMessagePolicy": "FallbackToLogsOnError", "volumeMounts": mounts}


def _inputs_mounts() -> list[dict[str, Any]]:
    return [{"name": "inputs", "mountPath": INPUTS_DIR, "readOnly": True},
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]


def _inputs_volumes(ft: FederatedTraining, side: str, tls_secret: str) -> list[dict[str, Any]]:
    inputs = [MODEL_FILE, EVAL_FILE] if side == "server" else [MODEL_FILE]  # clients never see the eval data
    return [_secret_volume("inputs", secret_name(ft), inputs),
            _secret_volume("tls", tls_secret, ["ca.crt", f"{side}.crt", f"{side}.key"]),
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]


def admitted(server_job: dict[str, Any]) -> tuple[str, list[Client]]:
    """The TLS id and the clients a server Job was made for (its annotations); ("", []) when it has none."""
    notes = server_job.get("metadata", {}).get("annotations") or {}
    try:
        pairs = json.loads(notes.get(CLIENTS, "[]"))
        return str(notes.get(TLS_ID, "")), [Client(str(node), int(index)) for node, index in pairs]
    except (TypeError, ValueError):
        return "", []


def render_server_job(ft: FederatedTraining, settings: Settings, node: str, clients: list[Client],
                      tls_id: str) -> dict[str, Any]:
    """The Flower server: every round, the report; at the end, the model, only when it beats the start and the
    gate. It admits at most `clients` (their certificates, signed once, are the only ones of the run's CA);
    its annotations record them and the TLS Secrets' suffix, for the steps that create the client Jobs."""
    s, a = ft.spec, ft.spec.aggregation
    args = [f"--model={INPUTS_DIR}/{MODEL_FILE}", f"--eval={INPUTS_DIR}/{EVAL_FILE}", f"--tls-dir={TLS_DIR}",
            f"--port={PORT}", f"--rounds={s.rounds}", f"--min-clients={s.min_clients}",
            f"--expected-clients={len(clients)}", f"--aggregation={a.strategy}",
            f"--epochs={s.training.epochs}", f"--learning-rate={s.training.learning_rate}",
            f"--batch-size={s.training.batch_size}", f"--round-timeout={s.round_timeout_seconds}",
            f"--wait-seconds={s.round_timeout_seconds}",  # for the clients to connect, at the start and each round
            f"--store={tenant_store(pod_store(settings), settings, ft)}",
            f"--name={ft.metadata['namespace']}-{ft.spec.target_model.name}",
            f"--report={report_ref(tenant_store(pod_store(settings), settings, ft), ft)}"]
    optional = {"--proximal-mu": a.proximal_mu, "--trim-fraction": a.trim_fraction,
                "--max-update-norm": a.max_update_norm, "--max-samples-per-client": a.max_samples_per_client}
    args += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    if s.evaluation.min_accuracy is not None:
        args.append(f"--min-accuracy={s.evaluation.min_accuracy}")
    env = [{"name": "EDGEFLEET_OCI_INSECURE", "value": "1"}] if settings.artifact_insecure else []
    container = _container(settings, ["server"] + args, _inputs_mounts(), env)
    container["ports"] = [{"name": "flower", "containerPort": PORT}]
    spec = _pod_spec(ft, node, container, _inputs_volumes(ft, "server", server_tls_secret(ft, tls_id)), "Never")
    spec = with_report_key(spec, "trainer", report_key_secret(run_name(ft)), report_binding(ft))
    pod = {"metadata": {"labels": labels(ft, "server")},
           "spec": with_registry_token(spec, "trainer", settings.registry_token_audience)}
    meta = _meta(ft, run_name(ft), "server")
    meta["annotations"] = {TLS_ID: tls_id, CLIENTS: json.dumps([[c.node, c.index] for c in clients],
                                                               separators=(",", ":"))}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600,
                     "activeDeadlineSeconds": s.rounds * s.round_timeout_seconds + 900,
                     "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                         "containerName": "trainer", "operator": "In", "values": SERVER_EXIT_NO_RETRY}}]},
                     "template": pod}}


def report_binding(ft: FederatedTraining) -> str:
    """What the server's report is sealed for: this FederatedTraining object (its uid), never a namesake's run."""
    return f"{ft.metadata['namespace']}/{run_name(ft)}/{ft.metadata.get('uid', '')}"


def render_client_job(ft: FederatedTraining, settings: Settings, client: Client, tls_id: str,
                      server: str = "") -> dict[str, Any]:
    """One client: its node's data directory read-only, its own TLS Secret; only the server's Service is its
    peer (`server`: its ClusterIP, for clusters without DNS; the certificate is checked against the Service's
    name). One pod, never replaced: a client that dies is a failure the server's rounds count, not a new
    participant (its identity has joined once; the server refuses it a second time)."""
    args = ["client", f"--model={INPUTS_DIR}/{MODEL_FILE}", f"--data={DATA_DIR}/{ft.spec.local_data.file_name}",
            f"--index={client.index}", f"--server={server or server_host(ft)}:{PORT}",
            f"--server-name={server_host(ft)}",
            f"--tls-dir={TLS_DIR}", f"--retry-seconds={ft.spec.round_timeout_seconds}"]
    mounts = _inputs_mounts() + [{"name": "data", "mountPath": DATA_DIR, "readOnly": True}]
    volumes = _inputs_volumes(ft, "client", client.tls_secret(run_name(ft), tls_id)) + [
        {"name": "data", "hostPath": {"path": ft.spec.local_data.host_path, "type": "Directory"}}]
    meta = _meta(ft, client.job_name(run_name(ft)), "client")
    meta["labels"]["edgefleet.io/shard-index"] = str(client.index)
    pod = {"metadata": {"labels": meta["labels"]},
           "spec": _pod_spec(ft, client.node, _container(settings, args, mounts), volumes, "Never")}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600,
                     "activeDeadlineSeconds": ft.spec.rounds * ft.spec.round_timeout_seconds + 900, "template": pod}}
