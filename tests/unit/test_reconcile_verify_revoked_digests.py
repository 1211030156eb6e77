"""spec.trust.revokedDigests: a validly signed variant that was revoked (found bad, or brought back by a
rollback or an edited EdgeModel status) does not roll out; the class keeps its pods and says why."""

from __future__ import annotations

import pytest
from edgefleet.api import EdgeDeployment, builtin_profiles
from edgefleet.reconcile import World, reconcile_deployment
from edgefleet.settings import Settings
from fake_kube import FakeKube
from pydantic import ValidationError

NS = "shop"
OLD = "sha256:" + "0a" * 32
NEW = "sha256:" + "0b" * 32
NODES = {"rpi-0": {"kubernetes.io/arch": "arm64"}}
TRUST = {"publicKeysSecret": "team-keys", "requireSignature": True}


def _variant(digest: str) -> dict:
    return {"profile": "cpu-arm64", "state": "Ready", "format": "onnx", "precision": "fp32", "digest": digest,
            "artifact": f"oci://registry.local/edgefleet@{digest}"}


def _kube(digest: str, trust: dict) -> FakeKube:
    kube = FakeKube()
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx"},
              "status": {"variants": [_variant(digest)]}})
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"modelRef": {"name": "digits"}, "trust": trust}})
    return kube


def _reconcile(kube: FakeKube) -> None:
    reconcile_deployment(kube, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))


def _served(kube: FakeKube) -> str:
    ds = kube.stored("DaemonSet", "digits-cpu-arm64", NS)
    return ds["spec"]["template"]["metadata"]["annotations"]["edgefleet.io/variant-digest"]


def _set_variant(kube: FakeKube, digest: str) -> None:
    kube.stored("EdgeModel", "digits", NS)["status"]["variants"] = [_variant(digest)]


def test_a_revoked_variant_does_not_roll_out_and_the_class_keeps_serving_its_pods():
    kube = _kube(NEW, {**TRUST, "revokedDigests": [OLD]})
    _reconcile(kube)
    assert _served(kube) == NEW
    _set_variant(kube, OLD)  # a rollback to the old, validly signed variant (or an edited status)
    _reconcile(kube)
    assert _served(kube) == NEW, "the revoked variant replaced what the class serves"
    status = kube.stored("EdgeDeployment", "digits", NS)["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "VariantRevoked"
    assert OLD in degraded["message"] and "spec.trust.revokedDigests" in degraded["message"]
    (cls,) = status["classes"]
    assert "revokedDigests" in cls["message"]
    assert [e["reason"] for e in kube.warnings()] == ["VariantRevoked"]


def test_a_revoked_variant_with_nothing_served_yet_creates_no_workload():
    kube = _kube(OLD, {**TRUST, "revokedDigests": [OLD]})
    _reconcile(kube)
    assert kube.stored("DaemonSet", "digits-cpu-arm64", NS) is None


def test_revoked_digests_must_be_sha256_digests():
    with pytest.raises(ValidationError, match="revokedDigests"):
        EdgeDeployment.model_validate({"metadata": {"name": "d", "namespace": NS}, "spec": {
            "modelRef": {"name": "digits"}, "trust": {**TRUST, "revokedDigests": ["v1.2"]}}})
