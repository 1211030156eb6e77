"""EdgeDeployment.spec.trust and EdgeModel.spec.encryption: API rules and what the renderer passes to the pods."""

from __future__ import annotations

import uuid

import pytest
from edgefleet.api import EdgeDeployment, EdgeModel, Variant, builtin_profiles
from edgefleet.render import render_class
from edgefleet.render.workload import CACHE_MOUNT, DECRYPTION_KEY_MOUNT, TRUST_KEYS_MOUNT
from pydantic import ValidationError

DIGEST = "sha256:" + "ab" * 32


def _pod(trust: dict | None):
    profiles = builtin_profiles()
    profile = next(p for p in profiles if p.metadata["name"] == "cpu-amd64")
    spec = {"modelRef": {"name": "digits"}, **({"trust": trust} if trust is not None else {})}
    ed = EdgeDeployment(metadata={"name": "digits", "namespace": "ns", "uid": str(uuid.uuid4())}, spec=spec)
    variant = Variant(profile="cpu-amd64", artifact="oci://r/m@" + DIGEST, digest=DIGEST, state="Ready")
    return render_class(ed, profile, variant, profiles, "/var/lib/edgefleet/cache")["spec"]["template"]["spec"]


def test_without_trust_the_pods_carry_no_trust_flags_or_volumes():
    pod = _pod(None)
    args = pod["initContainers"][1]["args"] + pod["containers"][0]["args"]
    assert not [a for a in args if a.startswith(("--public-key", "--require-signature", "--decryption-key"))]
    assert [v["name"] for v in pod["volumes"]] == ["model-cache"]


def test_trust_passes_keys_from_secret_volumes_to_fetch_and_serve():
    pod = _pod({"publicKeysSecret": "team-keys", "requireSignature": True,
                "decryptionKeySecret": {"name": "digits-kek", "key": "kek"}})
    fetch, serve = pod["initContainers"][1], pod["containers"][0]
    for c in (fetch, serve):
        assert f"--public-key={TRUST_KEYS_MOUNT}" in c["args"] and "--require-signature" in c["args"]
        assert {"name": "trust-public-keys", "mountPath": TRUST_KEYS_MOUNT, "readOnly": True} in c["volumeMounts"]
    # the decryption key reaches the runtime only, never the fetch container
    assert f"--decryption-key-file={DECRYPTION_KEY_MOUNT}/key" in serve["args"]
    assert not [a for a in fetch["args"] if a.startswith("--decryption-key-file")]
    assert [m for m in serve["volumeMounts"] if m["name"] == "decryption-key"][0]["readOnly"] is True
    assert not [m for m in fetch["volumeMounts"] if m["name"] == "decryption-key"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["trust-public-keys"] == {"name": "trust-public-keys", "secret": {"secretName": "team-keys"}}
    assert volumes["decryption-key"]["secret"] == {
        "secretName": "digits-kek", "items": [{"key": "kek", "path": "key"}], "defaultMode": 0o440}
    assert serve["volumeMounts"][0]["mountPath"] == CACHE_MOUNT


def test_public_keys_without_require_check_present_signatures_only():
    pod = _pod({"publicKeysSecret": "team-keys"})
    assert "--require-signature" not in pod["initContainers"][1]["args"]
    assert f"--public-key={TRUST_KEYS_MOUNT}" in pod["initContainers"][1]["args"]


def test_require_signature_without_keys_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="requireSignature needs spec.trust.publicKeysSecret"):
        EdgeDeployment(metadata={"name": "d", "namespace": "ns"},
                       spec={"modelRef": {"name": "m"}, "trust": {"requireSignature": True}})


def test_edgemodel_encryption_takes_a_pem_public_key():
    from edgefleet_runtime.trust import generate_signing_key

    _, public = generate_signing_key()
    em = EdgeModel(metadata={"name": "m", "namespace": "ns"},
                   spec={"source": {"uri": "https://h/m.onnx"}, "format": "onnx",
                         "encryption": {"publicKey": public.decode()}})
    assert em.spec.encryption.public_key == public.decode()
    for bad in ("hello", "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n"):
        with pytest.raises(ValidationError, match="publicKey must be one PEM public key.*keygen encryption"):
            EdgeModel(metadata={"name": "m", "namespace": "ns"},
                      spec={"source": {"uri": "https://h/m.onnx"}, "format": "onnx", "encryption": {"publicKey": bad}})


def _strategy(profile_name: str, spec: dict) -> dict:
    profiles = builtin_profiles()
    profile = next(p for p in profiles if p.metadata["name"] == profile_name)
    ed = EdgeDeployment(metadata={"name": "digits", "namespace": "ns", "uid": str(uuid.uuid4())},
                        spec={"modelRef": {"name": "digits"}, **spec})
    variant = Variant(profile=profile_name, artifact="oci://r/m@" + DIGEST, digest=DIGEST, state="Ready")
    return render_class(ed, profile, variant, profiles, "/var/lib/edgefleet/cache")["spec"]["updateStrategy"]


def test_verifying_classes_surge_so_a_refused_variant_never_removes_a_nodes_serving_pod():
    keys = {"trust": {"publicKeysSecret": "team-keys", "requireSignature": True}}
    assert _strategy("cpu-amd64", keys)["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert _strategy("cpu-amd64", {})["rollingUpdate"] == {"maxUnavailable": "25%"}  # unchanged without trust
    explicit = {**keys, "rollout": {"maxSurge": "50%"}}
    assert _strategy("cpu-amd64", explicit)["rollingUpdate"] == {"maxSurge": "50%", "maxUnavailable": 0}
    # a GPU class cannot hold two pods' devices: it rolls by maxUnavailable (the documented gap)
    assert _strategy("nvidia-gpu", keys)["rollingUpdate"] == {"maxUnavailable": "25%"}
    # waves replace pods themselves (OnDelete) and roll back on failure
    assert _strategy("cpu-amd64", {**keys, "rollout": {"waves": [50, 100]}}) == {"type": "OnDelete"}
