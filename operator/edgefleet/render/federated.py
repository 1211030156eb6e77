"""Pure manifests of one FederatedTraining run: the inputs ConfigMap (source model + evaluation data), the
server Job and its Service, and one client Pod per (participating node, shard index). The TLS Secret's
contents are made by the reconciler (random keys); here it is only mounted.

The server is a Job, not a Deployment: a run ends, and the Job's completion (exit 0 = published, 1 = failed)
is what the reconciler reads, beside the JSON report the server pushes to the artifact store every round.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from ..api.federated import FederatedTraining
from ..settings import Settings
from .workload import restricted_security_context

MANAGED_BY = "edgefleet"
NAME = "edgefleet-federated"
RUN = "edgefleet.io/federated-training"
PORT = 9092
UID = 10001
INPUTS_DIR = "/var/run/edgefleet/inputs"
TLS_DIR = "/var/run/edgefleet/tls"
DATA_DIR = "/var/lib/edgefleet/federated-data"
MODEL_FILE, EVAL_FILE = "model.onnx", "eval.npz"
SERVER_EXIT_NO_RETRY = [1, 2]  # 1 = the run failed (report says why), 2 = bad input: neither gets better by retrying


@dataclass(frozen=True)
class Client:
    node: str
    index: int

    def pod_name(self, run: str) -> str:
        return f"{run}-c-{_short(self.node)}-{self.index}"


def _short(value: str, size: int = 30) -> str:
    v = value.replace(".", "-").lower()
    if len(v) <= size:
        return v
    return f"{v[:size - 9].rstrip('-')}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def run_name(ft: FederatedTraining) -> str:
    """The run's children are named `fl-<name>` (a DNS label, at most 40 characters)."""
    return f"fl-{_short(ft.metadata['name'], 37)}"


def tls_secret_name(ft: FederatedTraining) -> str:
    return f"{run_name(ft)}-tls"


def server_host(ft: FederatedTraining) -> str:
    return f"{run_name(ft)}.{ft.metadata['namespace']}.svc"


def report_ref(settings: Settings, ft: FederatedTraining) -> str:
    """Where the server pushes its report: the artifact store's repository, tag `<run>-<uid8>-report`."""
    uid = ft.metadata.get("uid", "")[:8]
    return f"{settings.artifact_store.rstrip('/')}:{run_name(ft)}-{uid}-report"


def labels(ft: FederatedTraining, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": NAME, "app.kubernetes.io/managed-by": MANAGED_BY,
            "app.kubernetes.io/component": component, "app.kubernetes.io/instance": _short(ft.metadata["name"], 63),
            RUN: _short(ft.metadata["name"], 63)}


def _owner(ft: FederatedTraining) -> list[dict]:
    return [{"apiVersion": ft.api_version, "kind": "FederatedTraining", "name": ft.metadata["name"],
             "uid": ft.metadata["uid"], "controller": True, "blockOwnerDeletion": True}]


def _meta(ft: FederatedTraining, name: str, component: str) -> dict:
    return {"name": name, "namespace": ft.metadata["namespace"], "labels": labels(ft, component),
            "ownerReferences": _owner(ft)}


def render_inputs(ft: FederatedTraining, model: bytes, evaluation: bytes) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ft, f"{run_name(ft)}-inputs", "inputs"),
            "binaryData": {MODEL_FILE: base64.b64encode(model).decode(),
                           EVAL_FILE: base64.b64encode(evaluation).decode()}}


def render_tls_secret(ft: FederatedTraining, data: dict[str, bytes]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(ft, tls_secret_name(ft), "tls"),
            "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())}}


def render_service(ft: FederatedTraining) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(ft, run_name(ft), "server"),
            "spec": {"selector": {RUN: _short(ft.metadata["name"], 63), "app.kubernetes.io/component": "server"},
                     "ports": [{"name": "flower", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]}}


def _tls_volume(ft: FederatedTraining, side: str) -> dict:
    items = [{"key": "ca.crt", "path": "ca.crt"}, {"key": f"{side}.crt", "path": f"{side}.crt"},
             {"key": f"{side}.key", "path": f"{side}.key"}]
    return {"name": "tls", "secret": {"secretName": tls_secret_name(ft), "items": items, "defaultMode": 0o440}}


def _pod_spec(ft: FederatedTraining, node: str, container: dict, volumes: list[dict], restart: str) -> dict:
    return {"restartPolicy": restart, "automountServiceAccountToken": False, "enableServiceLinks": False,
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [t.to_dict() for t in ft.spec.participants.tolerations],
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": 5, "containers": [container], "volumes": volumes}


RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "768Mi"}}


def _container(settings: Settings, args: list[str], mounts: list[dict], env: list[dict] | None = None) -> dict:
    return {"name": "trainer", "image": settings.trainer_image, "command": ["edgefleet-federated"], "args": args,
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}] + (env or []),
            "resources": RESOURCES, "securityContext": restricted_security_context(UID),
            "terminationMessagePolicy": "FallbackToLogsOnError", "volumeMounts": mounts}


def _inputs_mounts() -> list[dict]:
    return [{"name": "inputs", "mountPath": INPUTS_DIR, "readOnly": True},
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]


def _inputs_volumes(ft: FederatedTraining, side: str) -> list[dict]:
    return [{"name": "inputs", "configMap": {"name": f"{run_name(ft)}-inputs"}}, _tls_volume(ft, side),
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]


def render_server_job(ft: FederatedTraining, settings: Settings, node: str, expected_clients: int) -> dict:
    """The Flower server: every round, the report; at the end, the model, only when it beats the start."""
    s = ft.spec
    args = [f"--model={INPUTS_DIR}/{MODEL_FILE}", f"--eval={INPUTS_DIR}/{EVAL_FILE}", f"--tls-dir={TLS_DIR}",
            f"--port={PORT}", f"--rounds={s.rounds}", f"--min-clients={s.min_clients}",
            f"--expected-clients={expected_clients}", f"--aggregation={s.aggregation.strategy}",
            f"--epochs={s.training.epochs}", f"--learning-rate={s.training.learning_rate}",
            f"--batch-size={s.training.batch_size}", f"--round-timeout={s.round_timeout_seconds}",
            f"--store={settings.artifact_store}", f"--name={ft.metadata['namespace']}-{ft.spec.target_model.name}",
            f"--report={report_ref(settings, ft)}"]
    if s.aggregation.proximal_mu is not None:
        args.append(f"--proximal-mu={s.aggregation.proximal_mu}")
    if s.evaluation.min_accuracy is not None:
        args.append(f"--min-accuracy={s.evaluation.min_accuracy}")
    env = [{"name": "EDGEFLEET_OCI_INSECURE", "value": "1"}] if settings.artifact_insecure else []
    container = _container(settings, ["server"] + args, _inputs_mounts(), env)
    container["ports"] = [{"name": "flower", "containerPort": PORT}]
    pod = {"metadata": {"labels": labels(ft, "server")},
           "spec": _pod_spec(ft, node, container, _inputs_volumes(ft, "server"), "Never")}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(ft, run_name(ft), "server"),
            "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600,
                     "activeDeadlineSeconds": s.rounds * s.round_timeout_seconds + 900,
                     "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                         "containerName": "trainer", "operator": "In", "values": SERVER_EXIT_NO_RETRY}}]},
                     "template": pod}}


def render_client_pod(ft: FederatedTraining, settings: Settings, client: Client) -> dict:
    """One client: its node's data directory read-only; only the server's Service is its peer."""
    args = ["client", f"--model={INPUTS_DIR}/{MODEL_FILE}", f"--data={DATA_DIR}/{ft.spec.local_data.file_name}",
            f"--index={client.index}", f"--server={server_host(ft)}:{PORT}", f"--server-name={server_host(ft)}",
            f"--tls-dir={TLS_DIR}", f"--retry-seconds={ft.spec.round_timeout_seconds}"]
    mounts = _inputs_mounts() + [{"name": "data", "mountPath": DATA_DIR, "readOnly": True}]
    volumes = _inputs_volumes(ft, "client") + [
        {"name": "data", "hostPath": {"path": ft.spec.local_data.host_path, "type": "Directory"}}]
    meta = _meta(ft, client.pod_name(run_name(ft)), "client")
    meta["labels"]["edgefleet.io/shard-index"] = str(client.index)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": _pod_spec(ft, client.node, _container(settings, args, mounts), volumes, "Never")}
