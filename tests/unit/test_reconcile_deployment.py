"""The EdgeDeployment reconciler against the in-memory fake of the one writer: what it applies, and how
errors reach the user (Degraded with reason and fix, one Warning event per transition) or get retried."""

from __future__ import annotations

import datetime

import pytest
from edgefleet.api import builtin_profiles
from edgefleet.kube import ApiError
from edgefleet.reconcile import World, reconcile_deployment
from edgefleet.reconcile.pods import UNSCHEDULABLE_GRACE_SECONDS
from edgefleet.settings import Settings
from fake_kube import FakeKube, api_error

NS = "shop"
DIGEST = "sha256:" + "ab" * 32
NODES = {
    "jetson-0": {"kubernetes.io/arch": "arm64", "nvidia.com/gpu.present": "true",
                 "nvidia.com/gpu.product": "NVIDIA-Jetson-Orin-Nano"},
    "jetson-1": {"kubernetes.io/arch": "arm64", "nvidia.com/gpu.present": "true",
                 "nvidia.com/gpu.product": "NVIDIA-Jetson-Orin-Nano"},
    "rpi-0": {"kubernetes.io/arch": "arm64"},
}


def stamp(seconds_ago: float) -> str:
    when = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def variant(profile: str) -> dict:
    return {"profile": profile, "state": "Ready", "format": "onnx", "precision": "fp32", "digest": DIGEST,
            "artifact": f"oci://registry.local/edgefleet@{DIGEST}"}


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx"},
              "status": {"variants": [variant("cpu-arm64"), variant("nvidia-jetson")]}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": NS}, "spec": {"modelRef": {"name": "digits"}}})
    return fake


def world(extra_profiles=()) -> World:
    return World(dict(NODES), builtin_profiles() + list(extra_profiles))


def reconcile(kube, extra_profiles=()) -> float | None:
    return reconcile_deployment(kube, Settings(), NS, "digits", world(extra_profiles))


def status(kube) -> dict:
    return kube.stored("EdgeDeployment", "digits", NS)["status"]


def condition(kube, type_: str) -> dict:
    return next(c for c in status(kube)["conditions"] if c["type"] == type_)


def classes(kube) -> dict[str, dict]:
    return {c["profile"]: c for c in status(kube)["classes"]}


def daemonset_reports(kube, name: str, desired: int, ready: int) -> None:
    """Play the DaemonSet controller: it has seen the current generation and counts pods."""
    ds = kube.stored("DaemonSet", name, NS)
    kube.set_status("DaemonSet", name, NS, {"observedGeneration": ds["metadata"]["generation"],
                                            "desiredNumberScheduled": desired, "numberReady": ready,
                                            "updatedNumberScheduled": desired})


def add_pod(kube, name: str, profile: str, status: dict) -> None:
    labels = {"app.kubernetes.io/name": "edgefleet-runtime", "app.kubernetes.io/instance": "digits",
              "app.kubernetes.io/managed-by": "edgefleet", "edgefleet.io/deployment": "digits",
              "edgefleet.io/profile": profile}
    kube.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
              "spec": {}, "status": status})


def unschedulable(seconds_ago: float) -> dict:
    return {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": stamp(seconds_ago),
        "message": "0/9 nodes are available: 1 Insufficient nvidia.com/gpu, 8 node(s) didn't match Pod's node "
                   "affinity/selector. preemption: 0/9 nodes are available: 1 No preemption victims found for "
                   "incoming pod, 8 Preemption is not helpful for scheduling."}]}


def test_one_daemonset_per_class_and_available_once_ready(kube):
    reconcile(kube)
    assert kube.stored("DaemonSet", "digits-cpu-arm64", NS) and kube.stored("DaemonSet", "digits-nvidia-jetson", NS)
    assert condition(kube, "Available")["status"] == "False"
    daemonset_reports(kube, "digits-cpu-arm64", 1, 1)
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 2)
    assert reconcile(kube) is None  # nothing left to watch for
    assert condition(kube, "Available")["status"] == "True"
    assert condition(kube, "Degraded")["status"] == "False"
    assert all("message" not in c for c in classes(kube).values())
    assert not kube.warnings()


def test_pending_pods_name_the_scheduler_reason_then_degrade_once(kube):
    reconcile(kube)
    daemonset_reports(kube, "digits-cpu-arm64", 1, 1)
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 0)
    add_pod(kube, "digits-nvidia-jetson-a", "nvidia-jetson", unschedulable(5))
    add_pod(kube, "digits-nvidia-jetson-b", "nvidia-jetson", unschedulable(5))
    again = reconcile(kube)
    jetson = classes(kube)["nvidia-jetson"]
    assert jetson["message"] == "2/2 pods Pending: Insufficient nvidia.com/gpu"
    assert "message" not in classes(kube)["cpu-arm64"]
    assert "nvidia-jetson: 2/2 pods Pending: Insufficient nvidia.com/gpu" in condition(kube, "Progressing")["message"]
    assert condition(kube, "Degraded")["status"] == "False"  # a refusal this young may be a rollout's moment
    assert again is not None and again <= UNSCHEDULABLE_GRACE_SECONDS - 5 + 1  # looks again when it counts

    for pod in ("digits-nvidia-jetson-a", "digits-nvidia-jetson-b"):
        kube.set_status("Pod", pod, NS, unschedulable(UNSCHEDULABLE_GRACE_SECONDS + 5))
    reconcile(kube)
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PodsUnschedulable")
    assert "Insufficient nvidia.com/gpu" in degraded["message"] and "Fix:" in degraded["message"]
    reconcile(kube)
    reconcile(kube)
    assert [e["reason"] for e in kube.warnings()] == ["PodsUnschedulable"]  # one event, on the transition

    daemonset_reports(kube, "digits-nvidia-jetson", 2, 2)  # the GPUs were freed
    for pod in ("digits-nvidia-jetson-a", "digits-nvidia-jetson-b"):
        kube.set_status("Pod", pod, NS, {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
    reconcile(kube)
    assert condition(kube, "Degraded")["status"] == "False"
    assert "message" not in classes(kube)["nvidia-jetson"]


def test_crash_loop_names_the_container_and_how_to_read_its_logs(kube):
    reconcile(kube)
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 2)
    daemonset_reports(kube, "digits-cpu-arm64", 1, 0)
    add_pod(kube, "digits-cpu-arm64-x", "cpu-arm64", {"phase": "Pending", "initContainerStatuses": [
        {"name": "fetch-model", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
         "lastState": {"terminated": {"exitCode": 2, "reason": "Error",
                                      "message": "digest mismatch: got sha256:00"}}}]})
    reconcile(kube)
    message = classes(kube)["cpu-arm64"]["message"]
    assert message == ("1/1 pods CrashLoopBackOff: init container fetch-model exited 2 (Error): "
                       "digest mismatch: got sha256:00")
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PodsFailing")
    assert f"kubectl logs -n {NS} digits-cpu-arm64-x -c fetch-model --previous" in degraded["message"]
    assert len(kube.warnings()) == 1


def crowded_profiles(priority: int) -> list[dict]:
    """Seven profiles (matching no node) whose negations expand a lower class's affinity to 2**7 terms."""
    from edgefleet.api import HardwareProfile

    base = builtin_profiles()[0].to_dict()
    out = []
    for i in range(7):
        obj = {**base, "metadata": {"name": f"crowd-{i}"},
               "spec": {**base["spec"], "priority": priority,
                        "nodeSelector": {"matchLabels": {f"example.com/a{i}": "x", f"example.com/b{i}": "y"}}}}
        out.append(HardwareProfile.model_validate(obj))
    return out


def test_placement_conflict_degrades_with_the_fix_and_other_classes_still_served(kube):
    crowd = crowded_profiles(priority=200)  # outranks cpu-arm64 (0), not nvidia-jetson (300)
    reconcile(kube, crowd)
    assert kube.stored("DaemonSet", "digits-nvidia-jetson", NS) is not None
    assert kube.stored("DaemonSet", "digits-cpu-arm64", NS) is None
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PlacementConflict")
    assert degraded["message"].startswith(f"cpu-arm64: DaemonSet {NS}/digits-cpu-arm64: the node selectors")
    assert "Fix: give overlapping HardwareProfiles distinct priorities" in degraded["message"]
    assert "PlacementConflict" not in classes(kube)["cpu-arm64"]["message"]
    assert "more than 64 node affinity terms" in classes(kube)["cpu-arm64"]["message"]
    assert condition(kube, "Available")["status"] == "False"
    reconcile(kube, crowd)
    assert [e["reason"] for e in kube.warnings()] == ["PlacementConflict"]


def test_api_refusal_of_a_child_is_permanent_and_keeps_what_runs(kube):
    reconcile(kube)
    daemonset_reports(kube, "digits-cpu-arm64", 1, 1)
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 2)
    reconcile(kube)
    refusal = api_error(422, 'DaemonSet.apps "digits-nvidia-jetson" is invalid: spec.template.spec.runtimeClassName: '
                             'Invalid value: "Nvidia": a lowercase RFC 1123 subdomain', "Invalid")
    kube.fail("apply", "DaemonSet", refusal, "digits-nvidia-jetson")
    recompiled = {**variant("nvidia-jetson"), "digest": "sha256:" + "cd" * 32}  # a change: applied, refused
    kube.set_status("EdgeModel", "digits", NS, {"variants": [variant("cpu-arm64"), recompiled]})
    assert reconcile(kube) is None  # not raised: retrying the same manifest gets the same answer
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidManifest")
    assert "spec.template.spec.runtimeClassName: Invalid value" in degraded["message"]
    assert "Fix: change the HardwareProfile or EdgeDeployment field" in degraded["message"]
    assert kube.stored("DaemonSet", "digits-nvidia-jetson", NS) is not None  # still serving the nodes
    assert classes(kube)["nvidia-jetson"]["ready"] == 2
    reconcile(kube)
    assert [e["reason"] for e in kube.warnings()] == ["InvalidManifest"]
    kube.heal()
    reconcile(kube)
    assert condition(kube, "Degraded")["status"] == "False"


@pytest.mark.parametrize("status", [500, 503, 429, 409])
def test_transient_api_errors_are_raised_for_the_controller_to_retry(kube, status):
    kube.fail("apply", "DaemonSet", api_error(status, "etcdserver: request timed out"))
    with pytest.raises(ApiError):
        reconcile(kube)
    assert not kube.warnings()


def test_forbidden_service_is_reported_with_the_rbac_fix(kube):
    kube.fail("apply", "Service", api_error(403, 'services is forbidden: User "system:serviceaccount:x:y" cannot '
                                                 'patch resource "services"', "Forbidden"))
    reconcile(kube)
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Forbidden")
    assert "rbac.create" in degraded["message"]
    assert kube.stored("DaemonSet", "digits-cpu-arm64", NS) is not None


def test_spec_the_models_refuse_is_reported_not_retried(kube):
    ed = kube.stored("EdgeDeployment", "digits", NS)
    ed["spec"]["mode"] = "Everywhere"
    assert reconcile(kube) is None
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert degraded["message"].startswith("spec.mode: ")
    assert not [c for c in kube.calls if c[0] == "apply"]
    reconcile(kube)
    assert [e["reason"] for e in kube.warnings()] == ["InvalidSpec"]


def test_missing_model_is_degraded_with_its_name(kube):
    kube.delete("EdgeModel", "digits", NS)
    reconcile(kube)
    degraded = condition(kube, "Degraded")
    assert (degraded["reason"], degraded["status"]) == ("ModelNotFound", "True")
    assert "'digits'" in degraded["message"]


def ready_pod() -> dict:
    return {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}


def fetch_failed(exit_code: int, message: str) -> dict:
    return {"phase": "Pending", "initContainerStatuses": [
        {"name": "fetch-model", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
         "lastState": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}}}]}


@pytest.mark.parametrize(("exit_code", "message", "reason", "fix"), [
    (8, "registry 10.245.0.1:5000 unreachable: 5 attempts over 14 s failed, last: ConnectionError: [Errno 111] "
        "Connection refused", "RegistryUnreachable", "cannot reach the artifact store"),
    (3, f"digest mismatch for oci://r/x@{DIGEST}: expected {DIGEST}, downloaded bytes have sha256:00",
     "VariantDigestMismatch", "publish the variant again"),
])
def test_a_surge_pod_that_cannot_fetch_its_variant_degrades_while_the_old_pod_serves(kube, exit_code, message,
                                                                                      reason, fix):
    """With rollout.maxSurge the DaemonSet's counts look complete (the old pod is Ready, the node counts as
    updated) while the node's new pod fails: its pods tell, and the operator keeps looking until they are Ready."""
    kube.stored("EdgeDeployment", "digits", NS)["spec"]["rollout"] = {"maxSurge": 1}
    reconcile(kube)
    daemonset_reports(kube, "digits-cpu-arm64", 1, 1)
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 2)
    add_pod(kube, "digits-cpu-arm64-old", "cpu-arm64", ready_pod())
    add_pod(kube, "digits-cpu-arm64-new", "cpu-arm64", {"phase": "Pending", "initContainerStatuses": [
        {"name": "fetch-model", "state": {"running": {}}}]})
    assert reconcile(kube) is not None  # a new pod is starting: look again
    assert condition(kube, "Degraded")["status"] == "False"
    assert condition(kube, "Progressing")["status"] == "True"
    kube.set_status("Pod", "digits-cpu-arm64-new", NS, fetch_failed(exit_code, message))
    assert reconcile(kube) is not None
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", reason)
    assert message in degraded["message"] and fix in degraded["message"], degraded["message"]
    assert f"init container fetch-model exited {exit_code} (Error): {message}" in classes(kube)["cpu-arm64"]["message"]
    assert condition(kube, "Available")["status"] == "True"  # the old pod serves
    reconcile(kube)
    assert [e["reason"] for e in kube.warnings()] == [reason]
    kube.set_status("Pod", "digits-cpu-arm64-new", NS, ready_pod())
    kube.delete("Pod", "digits-cpu-arm64-old", NS)
    assert reconcile(kube) is None
    assert condition(kube, "Degraded")["status"] == "False"
    assert condition(kube, "Progressing")["status"] == "False"


def test_an_unpullable_runtime_image_degrades_naming_the_profile_and_image(kube):
    reconcile(kube)
    daemonset_reports(kube, "digits-cpu-arm64", 1, 0)
    daemonset_reports(kube, "digits-nvidia-jetson", 2, 2)
    add_pod(kube, "digits-cpu-arm64-x", "cpu-arm64", {"phase": "Pending", "containerStatuses": [
        {"name": "runtime", "image": "ghcr.io/edgefleet/runtime-cpu:nope", "state": {"waiting": {
            "reason": "ImagePullBackOff", "message": 'Back-off pulling image "ghcr.io/edgefleet/runtime-cpu:nope"'}}}]})
    reconcile(kube)
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ImagePullFailed")
    assert "runtimeImage of HardwareProfile cpu-arm64 (ghcr.io/edgefleet/runtime-cpu:nope)" in degraded["message"]
    assert [e["reason"] for e in kube.warnings()] == ["ImagePullFailed"]
