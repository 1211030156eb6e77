"""Tenant-safe pods: a namespace user gets no more through edgefleet objects than Pod Security would give them.

Unprivileged classes render pods that Pod Security `restricted` admits (checked by a small checker of the
restricted rules below, itself shown to catch the pods that break them); a privileged class runs only where
its HardwareProfile lists the namespace; a FederatedTraining's host path and tolerations must be allowed by the
classes of its nodes, and '/' or control-plane tolerations never are.

The restricted pods need the node cache's CSI driver, opt-in for now (Settings.node_cache_driver): these tests
turn it on; without it the pods keep the hostPath cache and its root init container."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from edgefleet.api import EdgeDeployment, HardwareProfile, Variant, builtin_profiles, load
from edgefleet.api.base import format_errors
from edgefleet.reconcile import World, reconcile_deployment
from edgefleet.reconcile.federated import reconcile_federated
from edgefleet.render import render_class
from edgefleet.render.workload import CACHE_DRIVER
from edgefleet.settings import Settings
from fake_kube import FakeKube
from federated_helpers import EVAL, fresh_head_model
from pydantic import ValidationError

PROFILES = {p.metadata["name"]: p for p in builtin_profiles()}
DRIVER = Settings(node_cache_driver=True)  # the node cache through its CSI driver
HOST_CACHE = "/var/lib/edgefleet/cache"
DIGEST = "sha256:" + "cd" * 32

# ---- Pod Security Standards, `restricted` (which includes `baseline`), as the pod-security admission checks ----
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec Pod Security `restricted` refuses (empty: admitted). Pod-level runAsNonRoot and
    seccompProfile count for every container that does not set its own."""
    out: list[str] = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"spec.{key}")
    pod_sc = pod.get("securityContext") or {}
    out += [f"spec.securityContext.sysctls {s['name']}" for s in pod_sc.get("sysctls", [])
            if s["name"] not in SAFE_SYSCTLS]
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    if pod_sc.get("runAsUser") == 0:
        out.append("spec.securityContext.runAsUser 0")
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    for c in containers:
        out += [f"{c['name']}: {why}" for why in _container_violations(c, pod_sc)]
    return out


def _container_violations(c: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    sc = c.get("securityContext") or {}
    out = []
    if sc.get("privileged"):
        out.append("privileged")
    if any(p.get("hostPort") for p in c.get("ports", [])):
        out.append("hostPort")
    if sc.get("procMount", "Default") != "Default":
        out.append("procMount")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation is not false")
    if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
        out.append("runAsNonRoot is not true")
    if sc.get("runAsUser") == 0:
        out.append("runAsUser 0")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"seccompProfile {seccomp}")
    caps = sc.get("capabilities") or {}
    if "ALL" not in caps.get("drop", []):
        out.append("capabilities do not drop ALL")
    added = set(caps.get("add", []))
    if added - {"NET_BIND_SERVICE"}:
        out.append(f"capabilities add {sorted(added)}")
    if added - BASELINE_CAPABILITIES:
        out.append(f"capabilities add beyond baseline {sorted(added - BASELINE_CAPABILITIES)}")
    return out


def _deployment(namespace: str = "t", **spec: Any) -> EdgeDeployment:
    return EdgeDeployment.model_validate({"metadata": {"name": "digits", "namespace": namespace, "uid": "u"},
                                         "spec": {"modelRef": {"name": "digits"}, **spec}})


def _pod(profile: str, ed: EdgeDeployment | None = None) -> dict[str, Any]:
    variant = Variant(profile=profile, artifact=f"oci://r.example/m@{DIGEST}", digest=DIGEST, state="Ready")
    return render_class(ed or _deployment(), PROFILES[profile], variant, list(PROFILES.values()), HOST_CACHE,
                        cache_driver=True)["spec"]["template"]["spec"]


FULL = {"trust": {"publicKeysSecret": "keys", "requireSignature": True,
                  "decryptionKeySecret": {"name": "kek", "key": "key"}},
        "monitoring": {"drift": {}},
        "feedback": {"hardExamples": {"destination": "oci://r.example:5000/fleet/hard"}}}
UNPRIVILEGED = sorted(n for n, p in PROFILES.items() if not (p.spec.privileged or p.spec.device_mounts))


@pytest.mark.parametrize("spec", [{}, FULL, {"runtime": {"workers": 2, "grpcPort": 8081}}],
                         ids=["plain", "trust-monitoring-feedback", "workers-grpc"])
@pytest.mark.parametrize("profile", UNPRIVILEGED)
def test_tenant_unprivileged_class_pods_pass_pod_security_restricted(profile, spec):
    pod = _pod(profile, _deployment(**spec))
    assert restricted_violations(pod) == []
    for c in [*pod["initContainers"], *pod["containers"]]:  # the images' user, explicitly
        assert c["securityContext"]["runAsUser"] == 10001 and c["securityContext"]["runAsNonRoot"] is True


def test_tenant_checker_refuses_what_restricted_refuses():
    """The checker is not a rubber stamp: the privileged class's pod and each single breach are caught."""
    assert "cpu-amd64" in UNPRIVILEGED and "coral-edgetpu" not in UNPRIVILEGED
    coral = restricted_violations(_pod("coral-edgetpu"))
    assert "runtime: privileged" in coral and "runtime: runAsUser 0" in coral
    assert any(v.startswith("volume dev-usb") for v in coral)
    good = _pod("cpu-amd64")
    breaches = [
        lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        lambda p: p["initContainers"][0]["securityContext"].update(runAsUser=0),
        lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["CHOWN"]),
        lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        lambda p: p["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        lambda p: p["containers"][0]["securityContext"].pop("runAsNonRoot") and p["securityContext"].pop(
            "runAsNonRoot"),
        lambda p: p.update(hostNetwork=True),
    ]
    for breach in breaches:
        pod = copy.deepcopy(good)
        breach(pod)
        assert restricted_violations(pod), pod


def test_tenant_cache_is_the_node_cache_driver_and_names_no_namespace_or_host_path():
    """The pod names a folder only: the driver takes the namespace from the kubelet (pod info on mount), so a
    pod cannot ask for another namespace's part of the cache; no hostPath, no root init container."""
    pod = _pod("cpu-amd64", _deployment(**FULL))
    csi = {v["name"]: v["csi"] for v in pod["volumes"] if "csi" in v}
    assert csi == {"model-cache": {"driver": CACHE_DRIVER, "volumeAttributes": {"folder": "models"}},
                   "hard-examples": {"driver": CACHE_DRIVER, "volumeAttributes": {"folder": "hard-examples/digits"}}}
    assert not any("hostPath" in v for v in pod["volumes"])
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-model"]
    runtime = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert runtime["/var/lib/edgefleet/cache"]["readOnly"] is True  # the runtime cannot change the variants


# ---- a privileged class needs the admin's opt-in per namespace ----

CORAL_NODE = {"coral-0": {"kubernetes.io/arch": "arm64", "feature.node.kubernetes.io/usb-fe_1a6e_089a.present": "true"},
              "rpi-0": {"kubernetes.io/arch": "arm64"}}


def _variant(profile: str) -> dict:
    return {"profile": profile, "state": "Ready", "format": "tflite", "precision": "int8", "digest": DIGEST,
            "artifact": f"oci://r.example/m@{DIGEST}"}


def _deployment_kube(namespace: str) -> FakeKube:
    kube = FakeKube()
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": "digits",
              "namespace": namespace}, "spec": {"source": {"uri": "https://m.example/d.onnx"}, "format": "onnx"},
              "status": {"variants": [_variant("coral-edgetpu"), _variant("cpu-arm64")]}})
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": namespace}, "spec": {"modelRef": {"name": "digits"}}})
    return kube


def _profiles(**coral_spec: Any) -> list[HardwareProfile]:
    coral = PROFILES["coral-edgetpu"].model_copy(
        update={"spec": PROFILES["coral-edgetpu"].spec.model_copy(update=coral_spec)})
    return [coral if p.metadata["name"] == "coral-edgetpu" else p for p in PROFILES.values()]


def _reconciled_pod(settings: Settings) -> dict[str, Any]:
    kube = _deployment_kube("t")
    reconcile_deployment(kube, settings, "t", "digits", World(dict(CORAL_NODE), list(PROFILES.values())))
    return kube.stored("DaemonSet", "digits-cpu-arm64", "t")["spec"]["template"]["spec"]


def test_tenant_cache_driver_is_opt_in_and_the_operator_renders_what_the_setting_says(monkeypatch):
    """Off (the default): the hostPath cache and its root init container, which `restricted` refuses; on
    (EDGEFLEET_NODE_CACHE_DRIVER): the driver's volume, and the pod passes."""
    monkeypatch.delenv("EDGEFLEET_NODE_CACHE_DRIVER", raising=False)
    off = _reconciled_pod(Settings())
    assert off["volumes"][0] == {"name": "model-cache",
                                 "hostPath": {"path": Settings().node_cache, "type": "DirectoryOrCreate"}}
    assert [c["name"] for c in off["initContainers"]] == ["prepare-cache", "fetch-model"]
    assert "volume model-cache: ['hostPath']" in restricted_violations(off)
    monkeypatch.setenv("EDGEFLEET_NODE_CACHE_DRIVER", "true")
    on = _reconciled_pod(Settings())
    assert on["volumes"][0] == {"name": "model-cache", "csi": {"driver": CACHE_DRIVER,
                                                               "volumeAttributes": {"folder": "models"}}}
    assert restricted_violations(on) == []


def test_tenant_privileged_class_without_opt_in_is_refused_naming_allowed_namespaces():
    kube = _deployment_kube("t")
    reconcile_deployment(kube, DRIVER, "t", "digits", World(dict(CORAL_NODE), _profiles()))
    assert kube.stored("DaemonSet", "digits-coral-edgetpu", "t") is None  # fail closed: nothing privileged runs
    assert kube.stored("DaemonSet", "digits-cpu-arm64", "t") is not None  # the other class is served
    status = kube.stored("EdgeDeployment", "digits", "t")["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ClassNotAllowed"
    assert "HardwareProfile coral-edgetpu spec.allowedNamespaces" in degraded["message"]
    assert "adds it to HardwareProfile coral-edgetpu spec.allowedNamespaces" in degraded["message"]
    coral = next(c for c in status["classes"] if c["profile"] == "coral-edgetpu")
    assert "spec.allowedNamespaces" in coral["message"]
    assert [(w["reason"], "spec.allowedNamespaces" in w["message"]) for w in kube.warnings()] == [
        ("ClassNotAllowed", True)]


def test_tenant_privileged_class_runs_once_the_admin_lists_the_namespace_and_stops_when_removed():
    kube = _deployment_kube("t")
    reconcile_deployment(kube, DRIVER, "t", "digits", World(dict(CORAL_NODE), _profiles(allowed_namespaces=["t"])))
    ds = kube.stored("DaemonSet", "digits-coral-edgetpu", "t")
    assert ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] is True
    # the admin takes the opt-in back: the privileged workload goes, it is not kept "serving what it runs"
    reconcile_deployment(kube, DRIVER, "t", "digits", World(dict(CORAL_NODE), _profiles(allowed_namespaces=["x"])))
    assert kube.stored("DaemonSet", "digits-coral-edgetpu", "t") is None
    other = _deployment_kube("x")  # the namespace the admin listed
    reconcile_deployment(other, DRIVER, "x", "digits", World(dict(CORAL_NODE), _profiles(allowed_namespaces=["x"])))
    assert other.stored("DaemonSet", "digits-coral-edgetpu", "x") is not None


def test_tenant_allowed_namespaces_also_limits_an_unprivileged_class():
    kube = _deployment_kube("t")
    arm = PROFILES["cpu-arm64"]
    limited = arm.model_copy(update={"spec": arm.spec.model_copy(update={"allowed_namespaces": ["prod"]})})
    profiles = [limited if p is arm else p for p in _profiles(allowed_namespaces=["t"])]
    reconcile_deployment(kube, DRIVER, "t", "digits", World(dict(CORAL_NODE), profiles))
    assert kube.stored("DaemonSet", "digits-cpu-arm64", "t") is None
    degraded = next(c for c in kube.stored("EdgeDeployment", "digits", "t")["status"]["conditions"]
                    if c["type"] == "Degraded")
    assert "HardwareProfile cpu-arm64 spec.allowedNamespaces does not list namespace t" in degraded["message"]


# ---- FederatedTraining: host paths and tolerations the classes allow; '/' and the control plane never ----

NS = "t"
EDGE_TAINT = {"key": "node-role.kubernetes.io/edge", "operator": "Exists", "effect": "NoSchedule"}


def _ft_spec(**over: Any) -> dict[str, Any]:
    s = {"sourceModel": {"name": "digits"}, "targetModel": {"name": "digits"},
         "participants": {"hardwareClasses": ["edge"], "tolerations": [EDGE_TAINT]},
         "localData": {"hostPath": "/srv/fl/t/digits"}, "rounds": 2, "minClients": 1,
         "evaluation": {"data": {"configMap": {"name": "inputs", "key": "eval.npz"}}}}
    s.update(over)
    return s


def _edge_profile(paths: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "HardwareProfile", "metadata": {"name": "edge"},
            "spec": {"nodeSelector": {"matchLabels": {"edge": "yes"}}, "runtimeImage": "reg/runtime:1",
                     "target": {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime"},
                     "tolerations": [EDGE_TAINT], "localDataPaths": paths}}


def _ft_kube(spec: dict[str, Any], paths: list[dict[str, Any]], monkeypatch) -> FakeKube:
    kube = FakeKube()
    kube.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "inputs", "namespace": NS},
              "binaryData": {"model.onnx": base64.b64encode(fresh_head_model()).decode(),
                             "eval.npz": base64.b64encode(EVAL.read_bytes()).decode()}})
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": "digits",
              "namespace": NS}, "spec": {"source": {"configMap": {"name": "inputs", "key": "model.onnx"}},
                                         "format": "onnx"}})
    kube.add(_edge_profile(paths))
    kube.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "vm", "labels": {"edge": "yes"}}})
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining",
              "metadata": {"name": "ft", "namespace": NS, "uid": "1234567890", "generation": 1}, "spec": spec})
    monkeypatch.setattr("edgefleet.reconcile.federated._report", lambda kube, settings, ft: None)
    return kube


def _ft_step(kube: FakeKube) -> dict[str, Any]:
    settings = Settings(artifact_store="oci://registry.local:5000/edgefleet", trainer_image="reg/trainer:1")
    return reconcile_federated(kube, settings, kube.get("FederatedTraining", "ft", NS))


def _failed(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Failed" and c["status"] == "True")


ALLOWED = [{"hostPath": "/srv/fl/t", "namespaces": [NS]}]


def test_tenant_federated_allowed_host_path_and_toleration_run(monkeypatch):
    kube = _ft_kube(_ft_spec(), ALLOWED, monkeypatch)
    status = _ft_step(kube)
    assert next(c for c in status["conditions"] if c["type"] == "Progressing")["status"] == "True"
    (client,) = [j for j in kube.list("Job", NS) if j["metadata"]["labels"]["app.kubernetes.io/component"] == "client"]
    pod = client["spec"]["template"]["spec"]
    assert {"name": "data", "hostPath": {"path": "/srv/fl/t/digits", "type": "Directory"}} in pod["volumes"]
    assert pod["tolerations"] == [EDGE_TAINT]


@pytest.mark.parametrize(("path", "paths"), [
    ("/srv/fl/other", ALLOWED),  # outside the allowed directory
    ("/srv/fl/tx", ALLOWED),  # a sibling that shares the prefix, not a folder below
    ("/srv/fl/t/digits", [{"hostPath": "/srv/fl/t", "namespaces": ["someone-else"]}]),  # another namespace's
    ("/srv/fl/t/digits", []),  # the class allows nothing
    ("/etc", [{"hostPath": "/srv", "namespaces": [NS]}]),
])
def test_tenant_federated_host_path_not_allowed_fails_closed_naming_the_field(monkeypatch, path, paths):
    kube = _ft_kube(_ft_spec(localData={"hostPath": path}), paths, monkeypatch)
    failed = _failed(_ft_step(kube))
    assert failed["reason"] == "HostPathNotAllowed"
    assert f"spec.localData.hostPath {path} is not allowed for namespace {NS}" in failed["message"]
    assert "HardwareProfile edge spec.localDataPaths" in failed["message"]
    assert kube.list("Job", NS) == [] and kube.stored("Secret", "fl-ft-run", NS) is None
    assert [w["reason"] for w in kube.warnings()] == ["HostPathNotAllowed"]


@pytest.mark.parametrize("path", ["/", "//", "///"])
def test_tenant_federated_root_host_path_is_refused_at_admission(path):
    with pytest.raises(ValidationError) as err:
        load({"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "x"},
              "spec": _ft_spec(localData={"hostPath": path})})
    assert any("localData.hostPath must not be '/'" in line for line in format_errors(err.value))
    with pytest.raises(ValidationError) as err:  # nor can an admin allow the whole node
        load(_edge_profile([{"hostPath": path, "namespaces": [NS]}]))
    assert any("localDataPaths[].hostPath must not be '/'" in line for line in format_errors(err.value))


@pytest.mark.parametrize("toleration", [
    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node-role.kubernetes.io/master", "operator": "Exists"},
    {"operator": "Exists"},  # tolerates every taint, the control plane's included
])
def test_tenant_federated_control_plane_tolerations_are_refused_at_admission(toleration):
    spec = _ft_spec(participants={"hardwareClasses": ["edge"], "tolerations": [EDGE_TAINT, toleration]})
    with pytest.raises(ValidationError) as err:
        load({"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "x"},
              "spec": spec})
    assert any("participants.tolerations: training pods may not tolerate the control plane" in line
               for line in format_errors(err.value)), format_errors(err.value)


def test_tenant_federated_toleration_no_class_lists_fails_closed(monkeypatch):
    """A toleration the CRD lets through (not a control-plane key) still must be one the node's class lists."""
    other = {"key": "dedicated", "operator": "Equal", "value": "gpu-team", "effect": "NoSchedule"}
    kube = _ft_kube(_ft_spec(participants={"hardwareClasses": ["edge"], "tolerations": [EDGE_TAINT, other]}),
                    ALLOWED, monkeypatch)
    failed = _failed(_ft_step(kube))
    assert failed["reason"] == "TolerationNotAllowed"
    assert "spec.participants.tolerations" in failed["message"] and "HardwareProfile edge spec.tolerations" in failed[
        "message"]
    assert kube.list("Job", NS) == []


def test_tenant_federated_node_without_class_fails_closed(monkeypatch):
    kube = _ft_kube(_ft_spec(participants={"nodeSelector": {"matchLabels": {"edge": "yes"}}}), ALLOWED, monkeypatch)
    kube.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bare", "labels": {"edge": "yes",
                                                                                            "no-class": "x"}}})
    profile = kube.get("HardwareProfile", "edge")
    profile["spec"]["nodeSelector"] = {"matchLabels": {"edge": "yes"}, "matchExpressions": [
        {"key": "no-class", "operator": "DoesNotExist"}]}
    kube.add(profile)
    failed = _failed(_ft_step(kube))
    assert failed["reason"] == "NodeWithoutClass" and "node bare" in failed["message"]
    assert kube.list("Job", NS) == []
