"""The compile Job (executor ``job``): a batch/v1 Job running ``edgefleet compile`` in the compiler image,
plus the ConfigMap of its inputs. Pure: request + settings -> manifests; no I/O.

Contract with the operator (reconcile/compile_job.py):

- The Job lives in the operator's namespace (``settings.namespace``), not the model's, so it has no
  owner reference (owners cannot cross namespaces); it is labelled and annotated with the model's
  namespace and name, and garbage-collected by ``ttlSecondsAfterFinished``.
- Its name is a pure function of everything the compile depends on (model namespace/name/generation,
  source, policy, targets, input bytes, compiler image, artifact store): a restarted operator computes the
  same name and finds the running Job instead of starting a second one.
- Whatever the Job reads from the model's namespace (a ConfigMap source, calibration/evaluation data) is
  copied by the operator into a ConfigMap of the same name in the operator's namespace, owned by the Job,
  together with the targets as ``profiles.json``; it is mounted read-only at ``INPUTS_DIR``.
  ``uri`` sources (oci://, https://) are passed to the compiler as they are; ``pvc://`` is not supported
  (a claim cannot be mounted from another namespace).
- The EdgeModel's ``spec.encryption.publicKey`` travels in the inputs ConfigMap (it is public); the signing
  key is the Secret ``settings.signing_key_secret`` in the operator's namespace, mounted by the kubelet.
- Variants go to the artifact store (``--out``), and the JSON report is pushed there too, as a one-file
  artifact tagged ``<job name>-report`` (``--report oci://...``): the operator reads the results back from
  the store, never from pod logs.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet_runtime.sealed import BINDING_ENV, KEY_FILE_ENV

from ..api.compile import CompileRequest, CompileTarget
from ..settings import Settings
from .workload import restricted_security_context, with_registry_token

CONTAINER = "compile"
INPUTS_DIR = "/var/run/edgefleet/inputs"
WORK_DIR = "/tmp"  # an emptyDir: the root filesystem is read-only
CACHE_DIR = f"{WORK_DIR}/edgefleet-cache"
PROFILES_FILE = "profiles.json"
ENCRYPTION_FILE = "encryption.pub"  # the EdgeModel's spec.encryption.publicKey, in the inputs ConfigMap
SIGNING_DIR = "/var/run/edgefleet/signing"  # settings.signing_key_secret, key `key`
REPORT_KEY_DIR = "/var/run/edgefleet/report-key"  # the Job's own report key (edgefleet_runtime.sealed), key `key`
COMPILER_UID = 10001
BACKOFF_LIMIT = 2
TTL_SECONDS_AFTER_FINISHED = 3600  # the report outlives the Job in the artifact store
EXIT_NO_RETRY = [1, 2]  # edgefleet compile: 1 = a variant failed, 2 = bad input; both deterministic
MANAGED_BY = "edgefleet"
COMPILER_NAME = "edgefleet-compiler"
MODEL_NAMESPACE = "edgefleet.io/model-namespace"
MODEL_NAME = "edgefleet.io/model"
COMPILE_KEY = "edgefleet.io/compile-key"
REPORT_REF = "edgefleet.io/report"
WATCH_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/name": COMPILER_NAME}


@dataclass(frozen=True)
class CompileJobRequest:
    """One compile Job: the `CompileRequest` the inline compile would get, as the Job sees it (the source a URI or
    a file under ``INPUTS_DIR``, the data files there too), plus what the Job needs around it. ``files`` are file
    name -> bytes for the inputs ConfigMap (``profiles.json`` is added by ``inputs_files``)."""

    model_namespace: str
    generation: int
    request: CompileRequest  # request.name is the model's name
    files: dict[str, bytes] = field(default_factory=dict)
    encryption_public_key: str | None = None  # EdgeModel.spec.encryption.publicKey (PEM)

    @property
    def model_name(self) -> str:
        return self.request.name or ""


def in_inputs(path: str | Path | None) -> str | None:
    """The file name of ``path`` when it is one of the Job's inputs (under INPUTS_DIR), else None."""
    folder, _, name = str(path or "").rpartition("/")
    return name if folder == INPUTS_DIR else None


def profiles_document(targets: dict[str, CompileTarget]) -> str:
    """The targets as a HardwareProfile List that ``edgefleet compile --profiles-file`` reads (JSON is YAML)."""
    items = [{"apiVersion": "edgefleet.io/v1alpha1", "kind": "HardwareProfile", "metadata": {"name": name},
              "spec": _spec(targets[name])} for name in sorted(targets)]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, sort_keys=True, indent=1)


def _spec(target: CompileTarget) -> dict[str, Any]:
    spec: dict[str, Any] = {"target": target.model_dump(by_alias=True, exclude_none=True,
                                                        exclude={"max_model_size_bytes"})}
    if target.max_model_size_bytes:
        spec["budget"] = {"maxModelSizeBytes": target.max_model_size_bytes}
    return spec


def inputs_files(req: CompileJobRequest) -> dict[str, bytes]:
    files = {**req.files, PROFILES_FILE: profiles_document(req.request.targets).encode()}
    if req.encryption_public_key:
        files[ENCRYPTION_FILE] = req.encryption_public_key.encode()
    return files


def compile_key(req: CompileJobRequest, settings: Settings) -> str:
    """sha256 over everything the Job's outcome depends on (input bytes by digest), and the model's
    namespace and generation: one Job per model generation."""
    return _sha256(_key_blob(req, settings))


def content_key(req: CompileJobRequest, settings: Settings) -> str:
    """``compile_key`` without the model's generation: a generation whose change does not touch the compile has
    this key. The namespace stays in it: a namespace never takes another's compile (nor its bytes) from the store."""
    blob = _key_blob(req, settings)
    blob["model"] = [req.model_namespace, req.model_name]
    return _sha256(blob)


def _sha256(blob: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _key_blob(req: CompileJobRequest, settings: Settings) -> dict[str, Any]:
    r, policy = req.request, req.request.policy
    budget = policy.accuracyBudget
    blob: dict[str, Any] = {
        "v": 1,
        "model": [req.model_namespace, req.model_name, req.generation],
        "source": None if in_inputs(r.source) else r.source, "digest": r.digest,
        "targets": {name: t.to_dict() for name, t in r.targets.items()},
        "policy": [policy.quantization, policy.sparsity, budget.max_accuracy_drop if budget else None,
                   budget.min_cosine if budget else None],
        "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(req.files.items())},
        "roles": [in_inputs(r.source), in_inputs(policy.calibration), in_inputs(policy.evaluation)],
        "image": compiler_image(req, settings), "store": settings.artifact_store,
        "timingRuns": policy.timingRuns,
    }
    if policy.inputShapes:  # only when set: the Jobs of models without it keep their names
        blob["inputShapes"] = policy.inputShapes
    for key in ("pruning", "distillation"):  # likewise
        asked = getattr(policy, key)
        if asked is not None:
            blob[key] = asked.to_dict()
    if req.encryption_public_key:  # likewise: a new key is a new Job (rotation re-encrypts)
        blob["encryption"] = hashlib.sha256(req.encryption_public_key.encode()).hexdigest()
    if settings.signing_key_secret:
        blob["signing"] = settings.signing_key_secret
    return blob


def compile_job_name(req: CompileJobRequest, key: str) -> str:
    """``compile-<model>-<12 hex of the key>``, a DNS label of at most 63 characters."""
    stem = req.model_name.replace(".", "-")[:42].rstrip("-")
    return f"compile-{stem}-{key[:12]}"


def report_ref(artifact_store: str, job_name: str) -> str:
    """Where the Job pushes its JSON report: the artifact store's repository, tag ``<job>-report``."""
    return f"{artifact_store.rstrip('/')}:{job_name}-report"


def content_report_ref(artifact_store: str, key: str) -> str:
    """Where the operator pushes a report it accepted, sealed with its own key for ``content:<key>``: a later Job
    with the same content is never started, its report is read (and verified) from here."""
    return f"{artifact_store.rstrip('/')}:compiled-{key}"


def _label_value(value: str) -> str:
    if len(value) <= 63:
        return value
    return f"{value[:54].rstrip('-.')}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def job_labels(watch: dict[str, str], component: str, model_namespace: str, model_name: str) -> dict[str, str]:
    """Labels of a Job the operator runs for an EdgeModel (compile, bench): its kind's watch labels, and the model."""
    return {
        **watch,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": _label_value(model_name),
        MODEL_NAMESPACE: model_namespace,
        MODEL_NAME: _label_value(model_name),
    }


def compile_labels(req: CompileJobRequest) -> dict[str, str]:
    return job_labels(WATCH_LABELS, "compile", req.model_namespace, req.model_name)


def _args(req: CompileJobRequest, settings: Settings, name: str) -> list[str]:
    """The ``edgefleet compile`` flags that give the compiler ``req.request`` back."""
    r, policy = req.request, req.request.policy
    args = [r.source, f"--profiles-file={INPUTS_DIR}/{PROFILES_FILE}"]
    args += [f"--profile={p}" for p in sorted(r.targets)]
    args += [f"--quantization={policy.quantization}", f"--sparsity={policy.sparsity}"]
    if policy.calibration:
        args.append(f"--calibration={policy.calibration}")
    if policy.evaluation:
        args.append(f"--eval={policy.evaluation}")
    budget = policy.accuracyBudget
    if budget and budget.max_accuracy_drop is not None:
        args.append(f"--max-accuracy-drop={budget.max_accuracy_drop}")
    if budget and budget.min_cosine is not None:
        args.append(f"--min-cosine={budget.min_cosine}")
    if r.digest:
        args.append(f"--digest={r.digest}")
    args += [f"--input-shape={n}={'x'.join(map(str, dims))}" for n, dims in sorted(policy.inputShapes.items())]
    if policy.pruning is not None:
        args.append(f"--pruning={json.dumps(policy.pruning.to_dict(), sort_keys=True, separators=(',', ':'))}")
    if policy.distillation is not None:
        args.append("--distillation="
                    + json.dumps(policy.distillation.to_dict(), sort_keys=True, separators=(",", ":")))
    args += [f"--name={req.model_name}", f"--out={settings.artifact_store}",
             f"--report={report_ref(settings.artifact_store, name)}",
             f"--cache-dir={CACHE_DIR}",
             f"--timing-runs={policy.timingRuns}"]
    if req.encryption_public_key:
        args.append(f"--encryption-key-file={INPUTS_DIR}/{ENCRYPTION_FILE}")
    if settings.signing_key_secret:
        args.append(f"--signing-key-file={SIGNING_DIR}/key")
    return args


def render_compile_job(req: CompileJobRequest, settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job for ``req`` (its name from ``compile_key``)."""
    key = compile_key(req, settings)
    name = compile_job_name(req, key)
    labels = compile_labels(req)
    env = [{"name": "HOME", "value": WORK_DIR}, {"name": "TMPDIR", "value": WORK_DIR},
           {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if settings.artifact_insecure:
        env.append({"name": "EDGEFLEET_OCI_INSECURE", "value": "1"})
    trains = trainings(req)
    if trains and not settings.compiler_train_image:  # the compiler image has no PyTorch: say what to set
        env.append({"name": "EDGEFLEET_TRAIN_FIX", "value": TRAIN_FIX})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": compiler_image(req, settings),
        "command": ["edgefleet", "compile"],
        "args": _args(req, settings, name),
        "env": env,
        "resources": settings.train_resources if trains else settings.compile_resources,
        "securityContext": restricted_security_context(COMPILER_UID),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "inputs", "mountPath": INPUTS_DIR, "readOnly": True},
                         {"name": "work", "mountPath": WORK_DIR}],
    }
    volumes = [{"name": "inputs", "configMap": {"name": name}}, {"name": "work", "emptyDir": {"sizeLimit": "8Gi"}}]
    if settings.signing_key_secret:  # mounted by the kubelet: the operator itself never reads the key
        container["volumeMounts"].append({"name": "signing-key", "mountPath": SIGNING_DIR, "readOnly": True})
        volumes.append({"name": "signing-key", "secret": {"secretName": settings.signing_key_secret,
                                                          "items": [{"key": "key", "path": "key"}],
                                                          "defaultMode": 0o440}})
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": COMPILER_UID, "runAsGroup": COMPILER_UID,
                            "fsGroup": COMPILER_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
        **_placement(settings),
    }
    deadline = settings.compile_deadline_seconds + sum(int(t.deadline_seconds) for t in trains.values())
    return model_job(name, settings, labels, req, {COMPILE_KEY: key}, pod,
                     ModelJobPolicy(BACKOFF_LIMIT, deadline, CONTAINER, EXIT_NO_RETRY))


TRAIN_FIX = ("set the operator's compilerTrainImage (EDGEFLEET_COMPILER_TRAIN_IMAGE; chart value "
             "compile.trainImage) to a compiler image with the train extra, or remove optimization.pruning and "
             "optimization.distillation")


def trainings(req: CompileJobRequest) -> dict[str, Any]:
    """The trainings the compile asks for: {"pruning": ..., "distillation": ...} (each has epochs, deadline_seconds)."""
    policy = req.request.policy
    return {k: getattr(policy, k) for k in ("pruning", "distillation") if getattr(policy, k) is not None}


def compiler_image(req: CompileJobRequest, settings: Settings) -> str:
    """compiler_train_image for a compile that trains (when set), else compiler_image."""
    if trainings(req) and settings.compiler_train_image:
        return settings.compiler_train_image
    return settings.compiler_image


def training_note(req: CompileJobRequest, job: str, settings: Settings) -> str | None:
    """What a running compile Job trains, its deadline and where epoch and loss are logged; None: no training."""
    trains = trainings(req)
    if not trains:
        return None
    what = ", ".join(f"{k} ({t.epochs} epochs, deadline {int(t.deadline_seconds)} s)" for k, t in trains.items())
    where = f"kubectl logs -n {settings.namespace} job/{job}"
    if not settings.compiler_train_image:
        return f"training {what} asked, but compile Jobs run {settings.compiler_image} (no PyTorch): {TRAIN_FIX}"
    return f"training {what} in {settings.compiler_train_image}; epoch and loss: {where}"


@dataclass(frozen=True)
class ModelJobPolicy:
    """How a Job the operator runs for an EdgeModel retries and ends."""

    backoff_limit: int
    deadline_seconds: int
    container: str  # whose exit codes are final
    exit_no_retry: list[int]  # deterministic failures: retrying cannot help


def model_job(name: str, settings: Settings, labels: dict[str, str], req: Any, annotations: dict[str, str],
              pod: dict[str, Any], policy: ModelJobPolicy) -> dict[str, Any]:
    """A Job the operator runs for an EdgeModel (compile, bench): the model and its report named in annotations,
    deterministic failures not retried, pod disruptions ignored, kept an hour after it finishes. Its container
    seals the report with the Job's own key (``render_report_key``), bound to the Job's name."""
    pod = with_report_key(pod, policy.container, report_key_secret(name), name)
    pod = with_registry_token({**pod, "serviceAccountName": settings.job_service_account}, policy.container,
                              settings.registry_token_audience)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": {MODEL_NAMESPACE: req.model_namespace, MODEL_NAME: req.model_name,
                            "edgefleet.io/model-generation": str(req.generation), **annotations,
                            REPORT_REF: report_ref(settings.artifact_store, name)},
        },
        "spec": {
            "backoffLimit": policy.backoff_limit,
            "activeDeadlineSeconds": policy.deadline_seconds,
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": policy.container, "operator": "In",
                                                      "values": policy.exit_no_retry}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
        },
    }


def report_key_secret(job_name: str) -> str:
    return f"{job_name}-report-key"


def with_report_key(pod: dict[str, Any], container: str, secret: str, binding: str) -> dict[str, Any]:
    """``pod`` (a pod spec) with the report key of Secret ``secret`` mounted into ``container`` and named to it
    with its ``binding`` (EDGEFLEET_REPORT_KEY_FILE and EDGEFLEET_REPORT_BINDING, which
    ``edgefleet_runtime.sealed.seal_from_env`` reads)."""
    def mounted(c: dict[str, Any]) -> dict[str, Any]:
        if c["name"] != container:
            return c
        return {**c, "env": [*c.get("env", []), {"name": KEY_FILE_ENV, "value": f"{REPORT_KEY_DIR}/key"},
                             {"name": BINDING_ENV, "value": binding}],
                "volumeMounts": [*c.get("volumeMounts", []),
                                 {"name": "report-key", "mountPath": REPORT_KEY_DIR, "readOnly": True}]}

    volume = {"name": "report-key", "secret": {"secretName": secret,
                                               "items": [{"key": "key", "path": "key"}], "defaultMode": 0o440}}
    return {**pod, "containers": [mounted(c) for c in pod["containers"]],
            "volumes": [*pod.get("volumes", []), volume]}


def render_report_key(job: dict[str, Any], key: bytes) -> dict[str, Any]:
    """The Secret holding the Job's report key (hex), owned by the applied ``job`` so it goes with it."""
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": report_key_secret(meta["name"]),
            "namespace": meta["namespace"],
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": False}],
        },
        "type": "Opaque",
        "stringData": {"key": key.hex()},
    }


def _placement(settings: Settings) -> dict[str, Any]:
    """Where the compile pods may run: settings.compile_node_selector and compile_tolerations, when set."""
    placement: dict[str, Any] = {}
    if settings.compile_node_selector:
        placement["nodeSelector"] = dict(settings.compile_node_selector)
    if settings.compile_tolerations:
        placement["tolerations"] = [dict(t) for t in settings.compile_tolerations]
    return placement


def render_compile_inputs(req: CompileJobRequest, job: dict[str, Any]) -> dict[str, Any]:
    """The inputs ConfigMap: same name and namespace as ``job`` (an applied Job: it needs its uid), owned
    by it so it goes when the Job's TTL removes the Job."""
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": compile_labels(req),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": False}],
        },
        "binaryData": {k: base64.b64encode(v).decode() for k, v in sorted(inputs_files(req).items())},
    }


def inputs_size(req: CompileJobRequest) -> int:
    """Bytes the inputs ConfigMap will hold (ConfigMaps are limited to 1 MiB in all)."""
    return sum(len(base64.b64encode(v)) for v in inputs_files(req).values())
