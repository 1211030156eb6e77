"""Manifests for one hardware class of an EdgeDeployment: a DaemonSet (PerNode) or a Deployment
(Replicas) that fetches the class's variant into the node cache and serves it, plus the Service.

The node cache is, by default, a hostPath (Settings.node_cache) that a root init container (prepare-cache)
hands to the runtime user. With `cache_driver` (Settings.node_cache_driver) it is a CSI ephemeral volume of the
edgefleet node cache driver (the chart's DaemonSet in the operator's namespace, edgefleet_runtime.cachedriver):
the kubelet tells the driver the pod's namespace, and the driver mounts that namespace's own folder of the
node's cache, owned by the runtime user. Unprivileged classes then render pods that Pod Security `restricted`
admits (docs/security.md, "Runtime pods")."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from edgefleet_runtime.fetch import TOKEN_FILE_ENV
from pydantic import ValidationError

from ..api import ConfigMapKeyRef, EdgeDeployment, HardwareProfile, Variant
from ..api.models import RUNTIME_CACHE_MOUNT
from ..api.preprocessing import Postprocessing, Preprocessing
from .placement import higher_priority, node_affinity

RUNTIME_UID = 10001  # the runtime images run as this user
CACHE_MOUNT = RUNTIME_CACHE_MOUNT  # device mounts may not use it (admission refuses them)
CACHE_DRIVER = "cache.edgefleet.io"  # the CSI driver of the node cache (CSIDriver in the chart)
MODELS_FOLDER = "models"  # the variants' folder in the namespace's part of the node cache
DIGEST_ANNOTATION = "edgefleet.io/variant-digest"
TEMPLATE_HASH = "edgefleet.io/template-hash"
# rollout.prefetch: the pod annotations the runtime reads through a downward-API volume (serve --control-dir)
ACTIVE_ANNOTATION = "edgefleet.io/active-digest"
PREFETCH_ANNOTATION = "edgefleet.io/prefetch"
SHADOW_ANNOTATION = "edgefleet.io/shadow"
CONTROL_FILES = {"active": ACTIVE_ANNOTATION, "prefetch": PREFETCH_ANNOTATION, "shadow": SHADOW_ANNOTATION}
CONTROL_MOUNT = "/etc/edgefleet/control"
# On SIGTERM the runtime answers not-ready but keeps serving this long, so kube-proxy drops the pod from the
# Service before it stops listening (the images have no shell for a preStop sleep).
SHUTDOWN_DELAY_SECONDS = 5
MANAGED_BY = "edgefleet"


def child_name(deployment: str, profile: str) -> str:
    """<deployment>-<profile>, shortened with a hash when it would pass 63 characters."""
    name = f"{deployment}-{profile}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def child_labels(deployment: str, profile: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "edgefleet-runtime",
        "app.kubernetes.io/instance": deployment,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "edgefleet.io/deployment": deployment,
    }
    if profile:
        labels["app.kubernetes.io/component"] = profile
        labels["edgefleet.io/profile"] = profile
    return labels


def owner_reference(ed: EdgeDeployment) -> dict[str, Any]:
    return {
        "apiVersion": ed.api_version,
        "kind": ed.kind,
        "name": ed.metadata["name"],
        "uid": ed.metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ed: EdgeDeployment, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ed.metadata["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(ed)],
    }


def restricted_security_context(uid: int) -> dict[str, Any]:
    """The restricted Pod Security Standard for a container running as `uid`."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted(privileged: bool) -> dict[str, Any]:
    if privileged:  # stated by the profile: the device needs it
        return {"privileged": True, "runAsUser": 0, "runAsNonRoot": False}
    return restricted_security_context(RUNTIME_UID)


MEMORY_REQUEST_BYTES = 128 * 2**20


def _resources(profile: HardwareProfile) -> dict[str, Any]:
    """Extended resources as requests and limits; memory limited by the profile's budget.maxMemoryBytes
    (1Gi without one)."""
    extended = {k: str(v) for k, v in (profile.spec.extended_resources or {}).items()}
    limit = profile.spec.budget.max_memory_bytes if profile.spec.budget else None
    request, limit_text = ("128Mi", "1Gi") if limit is None else (str(min(limit, MEMORY_REQUEST_BYTES)), str(limit))
    return {"requests": {"cpu": "100m", "memory": request, **extended},
            "limits": {"memory": limit_text, **extended}}


TRUST_KEYS_MOUNT = "/etc/edgefleet/trust/public-keys"  # the public keys Secret, one PEM per key
DECRYPTION_KEY_MOUNT = "/etc/edgefleet/trust/decryption"  # the decryption key Secret's one key, as "key"


def _trust(ed: EdgeDeployment) -> tuple[list[str], list[str], list[dict[str, Any]], list[dict[str, Any]],
           list[dict[str, Any]]]:
    """(fetch args, serve args, fetch mounts, serve mounts, volumes) of spec.trust."""
    trust = ed.spec.trust
    if trust is None:
        return [], [], [], [], []
    fetch_args, serve_args, fetch_mounts, serve_mounts, volumes = [], [], [], [], []
    if trust.public_keys_secret:
        flags = [f"--public-key={TRUST_KEYS_MOUNT}"] + (["--require-signature"] if trust.require_signature else [])
        fetch_args += flags
        serve_args += flags
        mount = {"name": "trust-public-keys", "mountPath": TRUST_KEYS_MOUNT, "readOnly": True}
        fetch_mounts.append(mount)
        serve_mounts.append(mount)
        volumes.append({"name": "trust-public-keys", "secret": {"secretName": trust.public_keys_secret}})
    if trust.decryption_key_secret:
        ref = trust.decryption_key_secret
        serve_args.append(f"--decryption-key-file={DECRYPTION_KEY_MOUNT}/key")
        serve_mounts.append({"name": "decryption-key", "mountPath": DECRYPTION_KEY_MOUNT, "readOnly": True})
        volumes.append({"name": "decryption-key", "secret": {  # 0440: readable by the pod's fsGroup, the runtime's
            "secretName": ref.name, "items": [{"key": ref.key, "path": "key"}], "defaultMode": 0o440}})
    return fetch_args, serve_args, fetch_mounts, serve_mounts, volumes


EVALUATION_MOUNT = "/etc/edgefleet/evaluation"  # the EdgeModel's evaluation data (drift reference), as data.npz
SPOOL_MOUNT = "/var/lib/edgefleet/spool"  # the hard-example spool: a folder of the node cache, read-write
METRICS_MOUNT = "/run/edgefleet/metrics"  # serve --workers: the workers' shared metrics files (an emptyDir)
SPOOL_MAX_COUNT = 1_000_000  # the spool is bounded by feedback.hardExamples.maxBytesPerNode


def spool_path(ed: EdgeDeployment, cache_driver: bool = False) -> str:
    """The spool's folder inside the node cache: one per EdgeDeployment, kept across pod restarts. With the
    cache driver it lies in the namespace's own part of the cache, so the namespace is not part of it."""
    if cache_driver:
        return f"hard-examples/{ed.metadata['name']}"
    return f"hard-examples/{ed.metadata['namespace']}/{ed.metadata['name']}"


def cache_volume(name: str, folder: str) -> dict[str, Any]:
    """A CSI ephemeral volume: `folder` of the pod's own namespace's part of the node cache."""
    return {"name": name, "csi": {"driver": CACHE_DRIVER, "volumeAttributes": {"folder": folder}}}


def _feedback(ed: EdgeDeployment, evaluation: ConfigMapKeyRef | None, insecure: bool, cache_driver: bool
              ) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(serve args, serve mounts, volumes, env) of spec.monitoring and spec.feedback."""
    monitoring, hard = ed.spec.monitoring, ed.spec.feedback.hard_examples if ed.spec.feedback else None
    args, mounts, volumes, env = [], [], [], []
    if monitoring is not None:
        args += ["--monitoring", f"--uncertain-below={monitoring.confidence_below:g}"]
        drift = monitoring.drift
        if drift is not None:
            args += [f"--drift-window={drift.window_size}", f"--drift-threshold={drift.threshold:g}"]
        if drift is not None and evaluation is not None:
            args.append(f"--drift-eval={EVALUATION_MOUNT}/data.npz")
            mounts.append({"name": "evaluation-data", "mountPath": EVALUATION_MOUNT, "readOnly": True})
            volumes.append({"name": "evaluation-data", "configMap": {
                "name": evaluation.name, "items": [{"key": evaluation.key, "path": "data.npz"}]}})
    if hard is not None:
        args += [f"--hard-examples-dir={SPOOL_MOUNT}", f"--hard-examples-below={hard.confidence_below:g}",
                 f"--hard-examples-sample-rate={hard.sample_rate:g}",
                 f"--hard-examples-max-bytes={hard.max_bytes_per_node}", f"--hard-examples-max-count={SPOOL_MAX_COUNT}",
                 f"--hard-examples-upload={hard.destination}", f"--hard-examples-batch={hard.batch_size}",
                 f"--hard-examples-upload-interval={hard.upload_interval_seconds}"]
        if insecure:
            args.append("--hard-examples-insecure")
        if cache_driver:
            mounts.append({"name": "hard-examples", "mountPath": SPOOL_MOUNT})
            volumes.append(cache_volume("hard-examples", spool_path(ed, cache_driver)))
        else:
            mounts.append({"name": "model-cache", "mountPath": SPOOL_MOUNT, "subPath": spool_path(ed)})
        mounts.append({"name": "tmp", "mountPath": "/tmp"})  # the push's scratch files; the root fs is read-only
        volumes.append({"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}})
        env.append({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    return args, mounts, volumes, env


def controlled(ed: EdgeDeployment) -> bool:
    """Whether the runtime takes its updates from its pod's annotations (rollout.prefetch)."""
    return ed.spec.rollout.prefetch is not None


def in_place(ed: EdgeDeployment) -> bool:
    """Whether a new variant is activated inside the running pods (prefetch, activation.inPlace)."""
    activation = ed.spec.rollout.activation
    return controlled(ed) and (activation is None or activation.in_place)


def _control(ed: EdgeDeployment, insecure: bool) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(serve args, serve mounts, volumes) of rollout.prefetch: the pod's control annotations as files."""
    if not controlled(ed):
        return [], [], []
    args = [f"--control-dir={CONTROL_MOUNT}", f"--cache={CACHE_MOUNT}"] + (["--prefetch-insecure"] if insecure else [])
    items = [{"path": path, "fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}
             for path, key in CONTROL_FILES.items()]
    volume = {"name": "control", "downwardAPI": {"items": items}}
    return args, [{"name": "control", "mountPath": CONTROL_MOUNT, "readOnly": True}], [volume]


def model_transform(spec: dict[str, Any] | None) -> str | None:
    """The EdgeModel's spec.preprocessing and spec.postprocessing as the runtime's `--transform` JSON (compact,
    sorted: the pod template's hash changes only when they do); None when it declares neither. An invalid one
    (admission refuses it; the EdgeModel's reconciler reports it) is left out."""
    out: dict[str, Any] = {}
    for key, model in (("preprocessing", Preprocessing), ("postprocessing", Postprocessing)):
        value = (spec or {}).get(key)
        if value is None:
            continue
        try:
            out[key] = model.model_validate(value).model_dump(by_alias=True, exclude_none=True)
        except ValidationError:
            return None
    return json.dumps(out, sort_keys=True, separators=(",", ":")) if out else None


def _blob(digest: str) -> str:
    return f"{CACHE_MOUNT}/sha256/{digest.split(':', 1)[1]}"


def _prepare_cache(ed: EdgeDeployment, profile: HardwareProfile) -> dict[str, Any]:
    """The root init container of the hostPath cache: hostPath directories are created root-owned, so it hands
    the cache (and the spool, and the pipeline's queues) to the runtime user. The cache driver makes it unnecessary."""
    return {
        "name": "prepare-cache",
        "image": profile.spec.runtime_image,
        "command": ["edgefleet-runtime"],
        "args": ["prepare-cache", f"--cache={CACHE_MOUNT}", f"--uid={RUNTIME_UID}",
                 *([f"--spool={spool_path(ed)}"] if ed.spec.feedback and ed.spec.feedback.hard_examples else []),
                 *([f"--spool={pipeline_queue_path(ed)}"] if ed.spec.pipeline is not None else [])],
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_MOUNT}],
        "securityContext": prepare_cache_security(),
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }


def prepare_cache_security() -> dict[str, Any]:
    """prepare-cache runs as root with only CHOWN and FOWNER (it hands a root-owned hostPath to the runtime user)."""
    return {
        "runAsUser": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _containers(ed: EdgeDeployment, profile: HardwareProfile, variant: Variant, insecure: bool,
                evaluation: ConfigMapKeyRef | None, cache_driver: bool,
                transform: str | None = None, deltas: list[str] | None = None) -> tuple[list[Any], list[Any]]:
    model = ed.spec.model_ref.name
    port = ed.spec.runtime.port
    mounts = [{"name": "model-cache", "mountPath": CACHE_MOUNT}]
    assert variant.digest is not None, "only variants with a digest are rendered (ready_variants)"
    device_mounts = [
        {"name": f"dev-{m.name}", "mountPath": m.mount_path, "readOnly": m.read_only}
        for m in profile.spec.device_mounts or []
    ]
    trust_fetch, trust_serve, trust_fetch_mounts, trust_serve_mounts, _ = _trust(ed)
    fetch_args = ["fetch", f"--ref={variant.artifact}", f"--digest={variant.digest}", f"--cache={CACHE_MOUNT}",
                  f"--name={model}", *trust_fetch, *(f"--delta={d}" for d in deltas or [])]
    if insecure:
        fetch_args.append("--insecure")
    init = {
        "name": "fetch-model",
        "image": profile.spec.runtime_image,
        "command": ["edgefleet-runtime"],
        "args": fetch_args,
        "volumeMounts": mounts + trust_fetch_mounts,
        "securityContext": _restricted(False),
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    }
    serve_args = ["serve", f"--model={_blob(variant.digest)}", f"--digest={variant.digest}",
                  f"--name={model}", f"--port={port}", f"--shutdown-delay={SHUTDOWN_DELAY_SECONDS}", *trust_serve]
    if ed.spec.runtime.threads:
        serve_args.append(f"--threads={ed.spec.runtime.threads}")
    if profile.spec.target.execution_provider in ("tensorrt", "cuda") and not cache_driver:
        serve_args.append(f"--cache={CACHE_MOUNT}")  # TensorRT engines the bench Job built (trtcache), read-only
    feedback_args, feedback_mounts, _, feedback_env = _feedback(ed, evaluation, insecure, cache_driver)
    serve_args += feedback_args
    control_args, control_mounts, _ = _control(ed, insecure)
    serve_args += control_args
    if transform is not None:  # the same declared pre- and post-processing on every class
        serve_args.append(f"--transform={transform}")
    ports = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    if ed.spec.runtime.grpc_port:
        serve_args.append(f"--grpc-port={ed.spec.runtime.grpc_port}")
        ports.append({"name": "grpc", "containerPort": ed.spec.runtime.grpc_port, "protocol": "TCP"})
    workers_mounts = []
    if ed.spec.runtime.workers > 1:  # the workers' shared metrics files: the root filesystem is read-only
        serve_args += [f"--workers={ed.spec.runtime.workers}", f"--metrics-dir={METRICS_MOUNT}"]
        workers_mounts.append({"name": "runtime-metrics", "mountPath": METRICS_MOUNT})
    probe = {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5}
    serve = {
        "name": "runtime",
        "image": profile.spec.runtime_image,
        "command": ["edgefleet-runtime"],
        "args": serve_args,
        "ports": ports,
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/v2/health/live", "port": "http"}, "failureThreshold": 6},
        "resources": _resources(profile),
        "volumeMounts": [{**m, "readOnly": not control_args} for m in mounts] + trust_serve_mounts + device_mounts
        + feedback_mounts + workers_mounts + control_mounts,  # prefetch writes the cache
        "securityContext": _restricted(profile.spec.privileged),
        "env": [{"name": "EDGEFLEET_RUNTIME_CLASS", "value": profile.metadata["name"]}, *feedback_env],
    }
    containers = [serve]
    if ed.spec.pipeline is not None:
        containers.append(_pipeline_container(ed, profile, variant, transform, trust_serve,
                                              [{**m, "readOnly": True} for m in mounts] + trust_serve_mounts
                                              + device_mounts, cache_driver))
    return ([] if cache_driver else [_prepare_cache(ed, profile)]) + [init], containers


PIPELINE_QUEUE_MOUNT = "/var/lib/edgefleet/pipeline"  # the pipeline's on-disk queues (a folder of the node cache)


def pipeline_queue_path(ed: EdgeDeployment, cache_driver: bool = False) -> str:
    """The pipeline's queue folder inside the node cache: one per EdgeDeployment and node, kept across pod
    restarts and replacements (a rollout). With the cache driver it lies in the namespace's own part."""
    if cache_driver:
        return f"pipeline/{ed.metadata['name']}"
    return f"pipeline/{ed.metadata['namespace']}/{ed.metadata['name']}"


def pipeline_config(ed: EdgeDeployment) -> str:
    """spec.pipeline as the runtime's `pipeline --config-json` (edgefleet_runtime.pipeline.config)."""
    spec = ed.spec.pipeline
    assert spec is not None
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    queue = {"path": PIPELINE_QUEUE_MOUNT, "maxItems": spec.queue.max_items, "maxItemBytes": spec.queue.max_item_bytes,
             "maxBytes": spec.queue.size_limit_bytes // len(spec.sinks)}  # each sink its share of the disk
    config = {"name": ed.metadata["name"], "sources": dumped["sources"], "sinks": dumped["sinks"], "queue": queue,
              "maxPendingFrames": spec.max_pending_frames}
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _pipeline_container(ed: EdgeDeployment, profile: HardwareProfile, variant: Variant, transform: str | None,
                        trust_args: list[str], mounts: list[dict[str, Any]], cache_driver: bool) -> dict[str, Any]:
    """The pipeline beside the runtime: the same image, variant, trust flags, device mounts (cameras) and
    transform, its queues in a folder of the node cache (kept across pod restarts and rollouts)."""
    spec = ed.spec.pipeline
    assert spec is not None and variant.digest is not None
    args = ["pipeline", f"--model={_blob(variant.digest)}", f"--digest={variant.digest}",
            f"--name={ed.spec.model_ref.name}", f"--config-json={pipeline_config(ed)}",
            f"--metrics-port={spec.metrics_port}", *trust_args]
    if transform is not None:
        args.append(f"--transform={transform}")
    if ed.spec.runtime.threads:
        args.append(f"--threads={ed.spec.runtime.threads}")
    return {
        "name": "pipeline",
        "image": profile.spec.runtime_image,
        "command": ["edgefleet-runtime"],
        "args": args,
        "ports": [{"name": "pipeline-metrics", "containerPort": spec.metrics_port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": mounts + [{"name": "pipeline-queue", "mountPath": PIPELINE_QUEUE_MOUNT} if cache_driver else
                                  {"name": "model-cache", "mountPath": PIPELINE_QUEUE_MOUNT,
                                   "subPath": pipeline_queue_path(ed)}],
        "securityContext": _restricted(profile.spec.privileged),
        "env": [{"name": "EDGEFLEET_RUNTIME_CLASS", "value": profile.metadata["name"]}],
    }


def _volumes(ed: EdgeDeployment, profile: HardwareProfile, node_cache: str,
             evaluation: ConfigMapKeyRef | None, cache_driver: bool) -> list[dict[str, Any]]:
    if cache_driver:
        volumes = [cache_volume("model-cache", MODELS_FOLDER)]
    else:
        volumes = [{"name": "model-cache", "hostPath": {"path": node_cache, "type": "DirectoryOrCreate"}}]
    volumes += _trust(ed)[4]
    volumes += _feedback(ed, evaluation, False, cache_driver)[2]
    if ed.spec.runtime.workers > 1:
        volumes.append({"name": "runtime-metrics", "emptyDir": {"sizeLimit": "64Mi"}})
    volumes += _control(ed, False)[2]
    if ed.spec.pipeline is not None and cache_driver:
        volumes.append(cache_volume("pipeline-queue", pipeline_queue_path(ed, cache_driver)))
    volumes += [{"name": f"dev-{m.name}", "hostPath": {"path": m.host_path}} for m in profile.spec.device_mounts or []]
    return volumes


def _pod_template(ed: EdgeDeployment, profile: HardwareProfile, variant: Variant, profiles: list[HardwareProfile],
                  node_cache: str, insecure: bool, evaluation: ConfigMapKeyRef | None,
                  cache_driver: bool, transform: str | None = None, deltas: list[str] | None = None,
                  registry_token_audience: str = "") -> dict[str, Any]:
    labels = child_labels(ed.metadata["name"], profile.metadata["name"])
    init, containers = _containers(ed, profile, variant, insecure, evaluation, cache_driver, transform, deltas)
    affinity = node_affinity(
        [profile.spec.node_selector, ed.spec.node_selector],
        [p.spec.node_selector for p in higher_priority(profile, profiles)],
    )
    spec: dict[str, Any] = {
        "initContainers": init,
        "containers": containers,
        "volumes": _volumes(ed, profile, node_cache, evaluation, cache_driver),
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in profile.spec.tolerations],
        "securityContext": {"fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"},
                            **({"runAsNonRoot": True} if cache_driver and not profile.spec.privileged else {})},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
    }
    if affinity is not None:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": affinity}}
    if profile.spec.runtime_class_name:
        spec["runtimeClassName"] = profile.spec.runtime_class_name
    if ed.spec.feedback and ed.spec.feedback.hard_examples and registry_token_audience:
        spec = with_registry_token(spec, "runtime", registry_token_audience)
    template: dict[str, Any] = {"metadata": {"labels": labels, "annotations": {DIGEST_ANNOTATION: variant.digest}},
                                "spec": spec}
    template["metadata"]["annotations"][TEMPLATE_HASH] = template_hash(template)
    return template


def template_hash(template: dict[str, Any]) -> str:
    """A short hash of a pod template (without its own hash annotation): which pods are up to date."""
    annotations = {k: v for k, v in template["metadata"].get("annotations", {}).items() if k != TEMPLATE_HASH}
    body = {**template, "metadata": {**template["metadata"], "annotations": annotations}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def waves_of(ed: EdgeDeployment) -> list[int] | None:
    """The rollout waves of a PerNode deployment, or None for a plain rolling update."""
    rollout = ed.spec.rollout
    if ed.spec.mode != "PerNode":
        return None
    if rollout.waves:
        return list(rollout.waves)
    return [rollout.canary_percent, 100] if rollout.canary_percent else None


def render_class(
    ed: EdgeDeployment,
    profile: HardwareProfile,
    variant: Variant,
    profiles: list[HardwareProfile],
    node_cache: str,
    replicas: int | None = None,
    insecure: bool = False,
    evaluation: ConfigMapKeyRef | None = None,
    cache_driver: bool = False,
    transform: str | None = None,
    deltas: list[str] | None = None,
    registry_token_audience: str = "",
) -> dict[str, Any]:
    """The DaemonSet (PerNode) or Deployment (Replicas; `replicas` for this class) serving `variant`;
    `evaluation`: the EdgeModel's evaluation data, mounted as the drift reference when spec.monitoring.drift.
    The node cache is the hostPath `node_cache`, or with `cache_driver` the namespace's own CSI volume of the
    node cache driver (then `node_cache` is unused). `transform`: the EdgeModel's declared pre- and
    post-processing (model_transform), handed to the runtime as `--transform`. `deltas`: the fetch's `--delta`
    values (artifacts.deltas). With an in-place activation (rollout.prefetch) the template hash leaves the variant
    out: a new variant reaches running pods through their annotations, a new template restarts them. With hard
    examples to upload, the runtime pushes them with a projected token of the namespace's ServiceAccount for
    `registry_token_audience`."""
    name = child_name(ed.metadata["name"], profile.metadata["name"])
    labels = child_labels(ed.metadata["name"], profile.metadata["name"])
    template = _pod_template(ed, profile, variant, profiles, node_cache, insecure, evaluation, cache_driver,
                             transform, deltas, registry_token_audience)
    if in_place(ed):
        blank = variant.model_copy(update={"digest": "sha256:" + "0" * 64, "artifact": "variant"})
        template["metadata"]["annotations"][TEMPLATE_HASH] = _pod_template(
            ed, profile, blank, profiles, node_cache, insecure, evaluation, cache_driver, transform,
            registry_token_audience=registry_token_audience)["metadata"]["annotations"][TEMPLATE_HASH]
    max_unavailable = ed.spec.rollout.max_unavailable
    spec = {
        "selector": {"matchLabels": labels},
        "template": template,
        "minReadySeconds": ed.spec.rollout.health_gate.min_ready_seconds,
        "revisionHistoryLimit": 5,
    }
    if ed.spec.mode == "PerNode" and (waves_of(ed) or controlled(ed)):
        spec["updateStrategy"] = {"type": "OnDelete"}  # the operator replaces (or switches) pods wave by wave
        kind = "DaemonSet"
    elif ed.spec.mode == "PerNode":
        surge = _surge(ed, profile)  # a DaemonSet takes maxSurge only with maxUnavailable 0
        rolling = {"maxSurge": surge, "maxUnavailable": 0} if surge else {"maxUnavailable": max_unavailable}
        spec["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": rolling}
        kind = "DaemonSet"
    else:
        spec["replicas"] = replicas if replicas is not None else 0
        spec["strategy"] = {"type": "RollingUpdate",
                            "rollingUpdate": {"maxUnavailable": max_unavailable, "maxSurge": _surge(ed, profile)}}
        spec["progressDeadlineSeconds"] = ed.spec.rollout.health_gate.timeout_seconds
        kind = "Deployment"
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": _metadata(ed, name, labels), "spec": spec}


def _surge(ed: EdgeDeployment, profile: HardwareProfile) -> int | str:
    """rollout.maxSurge, or 0 where a second pod could not get the class's extended resources (a GPU).
    Omitted, it is 1 where spec.trust checks signatures: a node's old pod then stays until the new one is
    Ready, so a variant its fetch refuses never takes the node's model away."""
    if profile.spec.extended_resources:
        return 0
    if ed.spec.rollout.max_surge is not None:
        return ed.spec.rollout.max_surge
    return 1 if ed.spec.trust and ed.spec.trust.public_keys_secret and not waves_of(ed) else 0


def render_service(ed: EdgeDeployment) -> dict[str, Any]:
    name = ed.metadata["name"]
    labels = child_labels(name)
    spec: dict[str, Any] = {
        "type": ed.spec.service.type,
        "selector": labels,
        "ports": [{"name": "http", "port": ed.spec.service.port, "targetPort": "http", "protocol": "TCP"}],
    }
    if ed.spec.runtime.grpc_port:  # the same port number on the Service as in the pod
        port = ed.spec.runtime.grpc_port
        spec["ports"].append({"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP"})
    if ed.spec.service.type == "ClusterIP":
        spec["internalTrafficPolicy"] = "Local"  # serve on the node the request came from
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(ed, name, labels), "spec": spec}


def split_replicas(total: int, nodes_per_class: dict[str, int]) -> dict[str, int]:
    """Spread `total` replicas over classes in proportion to their node counts (largest remainder)."""
    nodes = sum(nodes_per_class.values())
    if nodes == 0:
        return {c: 0 for c in nodes_per_class}
    exact = {c: total * n / nodes for c, n in nodes_per_class.items()}
    share = {c: int(v) for c, v in exact.items()}
    left = total - sum(share.values())
    for c in sorted(exact, key=lambda c: (share[c] - exact[c], c))[:left]:
        share[c] += 1
    return share


REGISTRY_TOKEN_DIR = "/var/run/edgefleet/registry-token"  # a projected ServiceAccount token for the store
REGISTRY_TOKEN_SECONDS = 3600


def with_registry_token(pod: dict[str, Any], container: str, audience: str) -> dict[str, Any]:
    """``pod`` with a projected token of its ServiceAccount for ``audience`` (the store's token service) mounted
    into ``container`` and named to it (EDGEFLEET_REGISTRY_TOKEN_FILE, edgefleet_runtime.fetch.pusher_login);
    ``pod`` unchanged without an audience. The kubelet rotates the token; nothing else in the pod gets one."""
    if not audience:
        return pod

    def mounted(c: dict[str, Any]) -> dict[str, Any]:
        if c["name"] != container:
            return c
        return {**c, "env": [*c.get("env", []), {"name": TOKEN_FILE_ENV, "value": f"{REGISTRY_TOKEN_DIR}/token"}],
                "volumeMounts": [*c.get("volumeMounts", []),
                                 {"name": "registry-token", "mountPath": REGISTRY_TOKEN_DIR, "readOnly": True}]}

    source = {"serviceAccountToken": {"audience": audience, "expirationSeconds": REGISTRY_TOKEN_SECONDS,
                                      "path": "token"}}
    volume = {"name": "registry-token", "projected": {"sources": [source], "defaultMode": 0o440}}
    return {**pod, "containers": [mounted(c) for c in pod["containers"]],
            "volumes": [*pod.get("volumes", []), volume]}
