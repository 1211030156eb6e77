"""The EdgeModel reconciler against the in-memory fake of the one writer: refusals reach the user."""

from __future__ import annotations

import pytest
from edgefleet.api import builtin_profiles
from edgefleet.kube import ApiError
from edgefleet.reconcile import World, reconcile_model
from edgefleet.settings import Settings
from fake_kube import FakeKube, api_error, no_namespace

NS = "shop"


@pytest.fixture
def kube(monkeypatch) -> FakeKube:
    # no report in the artifact store yet (the Job never ran), so the reconciler starts the Job
    for module in ("compile_job", "model_jobs"):
        monkeypatch.setattr(f"edgefleet.reconcile.{module}.read_report", lambda settings, ref, key, binding: None)
    fake = FakeKube()
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx",
                       "targetProfiles": {"names": ["cpu-arm64", "nvidia-jetson"]}}})
    return fake


def job_settings() -> Settings:
    return Settings(compile_executor="job", artifact_store="oci://registry.local:5000/edgefleet")


def status(kube) -> dict:
    return kube.stored("EdgeModel", "digits", NS)["status"]


def condition(kube, type_: str) -> dict:
    return next(c for c in status(kube)["conditions"] if c["type"] == type_)


def test_a_refused_compile_job_fails_the_variants_with_the_reason(kube):
    kube.fail("apply", "Job", api_error(422, 'Job.batch "compile-x" is invalid: spec.template.spec.containers[0]'
                                             '.resources.requests: Invalid value: "2Gi": must be less than or '
                                             'equal to memory limit of 1Gi', "Invalid"))
    reconcile_model(kube, job_settings(), NS, "digits", World({}, builtin_profiles()))
    variants = {v["profile"]: v for v in status(kube)["variants"]}
    assert {v["state"] for v in variants.values()} == {"Failed"}
    assert variants["cpu-arm64"]["reason"] == "InvalidManifest"
    assert "must be less than or equal to memory limit" in variants["cpu-arm64"]["message"]
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidManifest")
    assert "Fix:" in degraded["message"]
    assert [e["reason"] for e in kube.warnings()] == ["InvalidManifest"]


@pytest.mark.parametrize("first_write", [("apply", "Job"), ("create", "Secret")])
def test_a_compile_job_into_a_missing_namespace_fails_the_variants_with_the_fix_not_retried(kube, first_write):
    """Whichever write reaches the missing namespace first (the operator's report key, or the Job)."""
    kube.fail(*first_write, no_namespace("edgefleet-system"))
    reconcile_model(kube, job_settings(), NS, "digits", World({}, builtin_profiles()))
    variants = {v["profile"]: v for v in status(kube)["variants"]}
    assert {v["reason"] for v in variants.values()} == {"NamespaceNotFound"}
    message = variants["cpu-arm64"]["message"]
    assert "namespace edgefleet-system does not exist" in message and "EDGEFLEET_NAMESPACE" in message
    assert (condition(kube, "Degraded")["reason"]) == "NamespaceNotFound"
    assert [e["reason"] for e in kube.warnings()] == ["NamespaceNotFound"]


def test_a_transient_error_starting_the_job_is_retried(kube):
    kube.fail("apply", "Job", api_error(503, "the server is currently unable to handle the request"))
    with pytest.raises(ApiError):
        reconcile_model(kube, job_settings(), NS, "digits", World({}, builtin_profiles()))
    assert not kube.warnings()


def test_spec_the_models_refuse_is_reported_not_retried(kube):
    kube.stored("EdgeModel", "digits", NS)["spec"]["optimization"] = {"quantization": "int3"}
    reconcile_model(kube, job_settings(), NS, "digits", World({}, builtin_profiles()))
    degraded = condition(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert degraded["message"].startswith("spec.optimization.quantization: ")
    assert condition(kube, "Ready")["status"] == "False"
    assert not [c for c in kube.calls if c[0] == "apply"]


def test_a_missing_configmap_is_looked_at_again_and_compiles_once_it_exists(kube):
    kube.stored("EdgeModel", "digits", NS)["spec"]["source"] = {"configMap": {"name": "digits-model",
                                                                              "key": "digits.onnx"}}
    world = World({}, builtin_profiles())
    reconcile_model(kube, job_settings(), NS, "digits", world)
    variants = status(kube)["variants"]
    assert {(v["state"], v["reason"]) for v in variants} == {("Failed", "SourceUnavailable")}
    assert "kubectl create configmap" in variants[0]["message"]
    patches = [c for c in kube.calls if c[0] == "patch_status"]
    reconcile_model(kube, job_settings(), NS, "digits", world)  # a resync while it is still missing
    assert [c for c in kube.calls if c[0] == "patch_status"] == patches  # nothing flaps
    assert [e["reason"] for e in kube.warnings()] == ["SourceUnavailable"]

    kube.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "digits-model", "namespace": NS},
              "binaryData": {"digits.onnx": "AAAA"}})
    reconcile_model(kube, job_settings(), NS, "digits", world)  # the next resync: the Job starts
    assert {v["state"] for v in status(kube)["variants"]} == {"Compiling"}
    assert [c for c in kube.calls if c[:2] == ("apply", "Job")]
