"""The operator's inline compile signs with settings.signing_key_file and encrypts for the EdgeModel's
spec.encryption.publicKey (no Secret read by the operator): what lands in the artifact store is ciphertext
with a signature the nodes verify."""

from __future__ import annotations

import base64
from pathlib import Path

from edgefleet.api import builtin_profiles
from edgefleet.reconcile import World, reconcile_model
from edgefleet.settings import Settings
from edgefleet_runtime import trust
from fake_kube import FakeKube

NS = "shop"
DIGITS = Path(__file__).resolve().parent.parent / "fixtures" / "models" / "digits_cnn.onnx"


def _keys(tmp_path):
    for name in ("sign", "enc"):
        private, public = trust.generate_signing_key()
        (tmp_path / f"{name}.key").write_bytes(private)
        (tmp_path / f"{name}.pub").write_bytes(public)


def _kube(public_key: str) -> FakeKube:
    fake = FakeKube()
    fake.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "digits-model", "namespace": NS},
              "binaryData": {"digits.onnx": base64.b64encode(DIGITS.read_bytes()).decode()}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS, "generation": 1},
              "spec": {"source": {"configMap": {"name": "digits-model", "key": "digits.onnx"}}, "format": "onnx",
                       "optimization": {"quantization": "none"},
                       "targetProfiles": {"names": ["cpu-amd64"]}, "encryption": {"publicKey": public_key}}})
    return fake


def test_inline_compile_publishes_signed_ciphertext(tmp_path):
    _keys(tmp_path)
    kube = _kube((tmp_path / "enc.pub").read_text())
    settings = Settings(compile_executor="inline", artifact_store=str(tmp_path / "store"),
                        compile_cache=tmp_path / "cache", compile_timing_runs=2,
                        signing_key_file=tmp_path / "sign.key")
    reconcile_model(kube, settings, NS, "digits", World({}, builtin_profiles()))
    (variant,) = kube.stored("EdgeModel", "digits", NS)["status"]["variants"]
    assert variant["state"] == "Ready", variant
    blob = tmp_path / "store" / "sha256" / variant["digest"].split(":")[1]
    stored = blob.read_bytes()
    assert trust.is_encrypted(stored)
    plain = trust.decrypt(stored, trust.load_decryption_key(tmp_path / "enc.key"))
    assert plain[:256] not in stored
    signature = blob.with_name(blob.name + ".sig").read_text()
    keys = trust.load_public_keys([tmp_path / "sign.pub"])
    assert trust.verify_digest(keys, variant["digest"], signature, "variant") == trust.key_id(keys[0])


def test_inline_compile_with_a_bad_signing_key_fails_the_variant_with_the_fix(tmp_path):
    _keys(tmp_path)
    kube = _kube((tmp_path / "enc.pub").read_text())
    settings = Settings(compile_executor="inline", artifact_store=str(tmp_path / "store"),
                        compile_cache=tmp_path / "cache", signing_key_file=tmp_path / "sign.pub")
    reconcile_model(kube, settings, NS, "digits", World({}, builtin_profiles()))
    (variant,) = kube.stored("EdgeModel", "digits", NS)["status"]["variants"]
    assert variant["state"] == "Failed" and variant["reason"] == "InvalidSigningKey", variant
    assert "EDGEFLEET_SIGNING_KEY_FILE" in variant["message"]
    assert not (tmp_path / "store" / "sha256").exists()
