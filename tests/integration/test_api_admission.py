"""The CRDs against the real API server: they apply, explain themselves, print columns, reject every
manifest in tests/data/invalid/ with a message naming the field, and accept (and round-trip) every
valid object."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import yaml
from edgefleet.api import EdgeModelSpec, builtin_profiles, load

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
PROFILES = REPO / "operator" / "edgefleet" / "profiles"
INVALID = sorted((REPO / "tests" / "data" / "invalid").glob("*.yaml"))
EXAMPLES = sorted((REPO / "examples" / "minimal").glob("*.yaml"))
DIGEST = "sha256:" + "0123456789abcdef" * 4
ENCRYPTION_PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE0+GHg8IIMSXpGLlLGebwXLZcWKjK
BKXGvKmUwVCEli32+ty8ATiqQn8RX5EVYlPFeTyENoWXUTw8W9aGf6x43w==
-----END PUBLIC KEY-----
"""

# Objects that use every spec field, applied next to the examples.
FULL = [
    {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": "full"},
     "spec": {"source": {"configMap": {"name": "tiny", "key": "model.onnx"}, "digest": DIGEST},
              "format": "onnx",
              "optimization": {"quantization": "static-int8",
                               "calibration": {"uri": "pvc://datasets/calib.npz"}, "sparsity": 0.25,
                               "accuracyBudget": {"maxAccuracyDrop": 1, "minCosine": 0.99},
                               "evaluation": {"configMap": {"name": "eval", "key": "eval.npz"}},
                               "inputShapes": {"x": [1, 3, 48, 192], "mask": [1, 48]}},
              "targetProfiles": {"selector": {"matchLabels": {"edgefleet.io/builtin": "true"}}},
              "encryption": {"publicKey": ENCRYPTION_PUBLIC_KEY}}},
    {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment", "metadata": {"name": "full"},
     "spec": {"modelRef": {"name": "full"},
              "nodeSelector": {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In",
                                                     "values": ["arm64"]},
                                                    {"key": "node-role.kubernetes.io/edge", "operator": "Exists"}]},
              "mode": "Replicas", "replicas": 3,
              "rollout": {"maxUnavailable": 2, "canaryPercent": 10,
                          "healthGate": {"minReadySeconds": 0, "timeoutSeconds": 60}, "autoRollback": False},
              "runtime": {"threads": 2, "port": 9000},
              "service": {"enabled": False, "type": "NodePort", "port": 30080},
              "trust": {"publicKeysSecret": "team-keys", "requireSignature": True,
                        "decryptionKeySecret": {"name": "full-kek", "key": "key"}}}},
    {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment", "metadata": {"name": "waves"},
     "spec": {"modelRef": {"name": "full"}, "rollout": {"waves": [5, 25, 100], "maxUnavailable": "100%"}}},
    {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment", "metadata": {"name": "updates"},
     "spec": {"modelRef": {"name": "full"}, "rollout": {
         "canaryPercent": 10, "prefetch": {"deadlineSeconds": 600},
         "activation": {"inPlace": True, "after": "2026-12-08T02:00:00Z", "manual": True, "approvedDigest": DIGEST},
         "shadow": {"sampleRate": 0.2, "minRequests": 500, "minAgreement": 0.9, "maxDurationSeconds": 1800,
                    "agreement": "cosine"}}}},
]


@pytest.fixture(scope="module")
def api(edgefleet_api):
    """The cluster with the CRDs and the built-in profiles applied."""
    return edgefleet_api


@pytest.fixture(scope="module")
def scratch(api):
    """One namespace for the rejection tests (nothing is ever created in it)."""
    name = f"t-invalid-{uuid.uuid4().hex[:6]}"
    api.kubectl("create", "namespace", name)
    yield name
    api.kubectl("delete", "namespace", name, "--wait=false", check=False)


def get_json(cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_builtin_profiles_applied(api):
    names = {i["metadata"]["name"] for i in get_json(api, "hardwareprofiles")["items"]}
    assert {p.metadata["name"] for p in builtin_profiles()} <= names
    admin = {"allowed_namespaces", "local_data_paths"}  # what an admin (here: other tests) opts namespaces into
    for profile in builtin_profiles():
        live = get_json(api, "hwp", profile.metadata["name"])
        assert load(live).spec.model_dump(exclude=admin) == profile.spec.model_dump(exclude=admin)


def test_explain_prints_the_model_docs(api):
    expected = " ".join(EdgeModelSpec.model_fields["optimization"].description.split()[:6])
    for _ in range(20):  # the published OpenAPI follows the CRD after a short delay
        out = api.kubectl("explain", "edgemodel.spec.optimization", check=False)
        if out.returncode == 0 and expected in " ".join(out.stdout.split()):
            break
        time.sleep(1)
    text = " ".join(out.stdout.split())
    assert expected in text, out.stdout + out.stderr
    for field in ("quantization", "calibration", "sparsity", "accuracyBudget", "evaluation"):
        assert field in text


def test_valid_objects_accepted_and_round_trip(api, namespace):
    objs = [yaml.safe_load(p.read_text()) for p in EXAMPLES] + FULL
    api.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objs))
    for obj in objs:
        live = get_json(api, "-n", namespace, obj["kind"].lower(), obj["metadata"]["name"])
        assert load(live).to_dict() == live
        # the API server's defaults are the models' defaults
        assert live["spec"] == load(obj).to_dict()["spec"], f"{obj['kind']}/{obj['metadata']['name']}"


def test_printer_columns(api, namespace):
    objs = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    api.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objs))
    out = api.kubectl("get", "em,ed,hwp", "-n", namespace).stdout
    headers = [line.split() for line in out.splitlines() if line.startswith("NAME")]
    assert ["NAME", "FORMAT", "READY", "VARIANTS", "AGE"] in headers, out
    assert ["NAME", "MODEL", "MODE", "READY", "NODES", "AGE"] in headers, out
    assert ["NAME", "PRIORITY", "FORMAT", "PRECISION", "RUNTIME", "NODES", "AGE"] in headers, out
    assert "edgefleet" in api.kubectl("get", "edgefleet", "-n", namespace).stdout  # the category


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_rejected(api, scratch, path):
    expect = re.search(r"^# expect: (.+)$", path.read_text(), re.M).group(1).strip()
    result = api.kubectl("apply", "--server-side", "-n", scratch, "-f", str(path), check=False)
    if result.returncode == 0:  # don't leave a cluster-scoped stray behind
        api.kubectl("delete", "-n", scratch, "-f", str(path), "--wait=false", check=False)
    assert result.returncode != 0, f"{path.name} was accepted"
    assert expect in result.stderr, f"{path.name}: message does not name {expect!r}:\n{result.stderr}"


def test_status_subresource_round_trips(api, namespace):
    em = yaml.safe_load((REPO / "examples" / "minimal" / "edgemodel.yaml").read_text())
    api.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(em))
    status = {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "False", "observedGeneration": 1, "reason": "Compiling",
                        "lastTransitionTime": "2025-01-02T03:04:05Z", "message": "1/2 variants ready"}],
        "variants": [{"profile": "cpu-arm64", "format": "onnx", "precision": "int8", "quantization": "dynamic-int8",
                      "digest": DIGEST, "sizeBytes": 1000, "latencyP50Ms": 0.5, "accuracyDelta": -0.25,
                      "state": "Ready"},
                     {"profile": "nvidia-jetson", "state": "Compiling"}],
        "variantsReady": "1/2",
    }
    api.kubectl("patch", "-n", namespace, "edgemodel", em["metadata"]["name"], "--subresource=status",
                "--type=merge", "-p", json.dumps({"status": status}))
    live = get_json(api, "-n", namespace, "edgemodel", em["metadata"]["name"])
    assert load(live).to_dict() == live
    assert live["status"]["variantsReady"] == "1/2"
    row = api.kubectl("get", "em", em["metadata"]["name"], "-n", namespace, "--no-headers").stdout.split()
    assert row[2:4] == ["False", "1/2"], row
