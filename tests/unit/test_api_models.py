"""The edgefleet API models: wire round-trips, defaults, rejections that name the field, built-ins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from edgefleet.api import (
    EdgeDeployment,
    EdgeModel,
    HardwareProfile,
    best_profile,
    builtin_profiles,
    format_errors,
    load,
)
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
INVALID = sorted((REPO / "tests" / "data" / "invalid").glob("*.yaml"))
EXAMPLES = sorted((REPO / "examples" / "minimal").glob("*.yaml"))
DIGEST = "sha256:" + "0123456789abcdef" * 4

# Complete objects (every field set, defaults spelt out): to_dict() must give them back unchanged.
FULL_MODEL = {
    "apiVersion": "edgefleet.io/v1alpha1",
    "kind": "EdgeModel",
    "metadata": {"name": "digits", "namespace": "demo", "labels": {"app": "digits"}},
    "spec": {
        "source": {"uri": "oci://registry.local/models/digits:1", "digest": DIGEST},
        "format": "onnx",
        "optimization": {
            "quantization": "static-int8",
            "calibration": {"configMap": {"name": "digits-calib", "key": "calib.npz"}},
            "sparsity": 0.5,
            "accuracyBudget": {"maxAccuracyDrop": 1.5, "minCosine": 0.98},
            "evaluation": {"uri": "pvc://datasets/digits/eval.npz"},
        },
        "targetProfiles": {"names": ["cpu-arm64", "nvidia-jetson"]},
    },
    "status": {
        "observedGeneration": 3,
        "conditions": [{"type": "Ready", "status": "True", "observedGeneration": 3,
                        "lastTransitionTime": "2025-01-02T03:04:05Z", "reason": "AllVariantsReady",
                        "message": "2/2 variants ready"}],
        "variants": [{"profile": "cpu-arm64", "format": "onnx", "precision": "int8",
                      "quantization": "static-int8", "artifact": "oci://registry.local/variants/digits@" + DIGEST,
                      "digest": DIGEST, "sizeBytes": 123456, "latencyP50Ms": 1.25, "accuracyDelta": -0.4,
                      "state": "Ready", "reason": "Compiled", "message": "ok"}],
        "variantsReady": "1/2",
    },
}

FULL_DEPLOYMENT = {
    "apiVersion": "edgefleet.io/v1alpha1",
    "kind": "EdgeDeployment",
    "metadata": {"name": "digits", "namespace": "demo"},
    "spec": {
        "modelRef": {"name": "digits"},
        "nodeSelector": {"matchLabels": {"node-role.kubernetes.io/edge": ""},
                         "matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In",
                                               "values": ["arm64", "amd64"]}]},
        "mode": "Replicas",
        "replicas": 2,
        "rollout": {"maxUnavailable": 1, "waves": [10, 50, 100],
                    "healthGate": {"minReadySeconds": 5, "timeoutSeconds": 120}, "autoRollback": False},
        "runtime": {"threads": 4, "port": 9000, "workers": 2},
        "service": {"enabled": True, "type": "NodePort", "port": 80},
    },
    "status": {
        "observedGeneration": 1,
        "conditions": [],
        "classes": [{"profile": "cpu-arm64", "desired": 3, "ready": 2, "updated": 2, "digest": DIGEST}],
        "unmatchedNodes": 1,
        "nodesReady": "2/3",
    },
}


def expectation(path: Path) -> str:
    found = re.findall(r"^# expect: (.+)$", path.read_text(), re.M)
    assert len(found) == 1, f"{path.name}: needs exactly one '# expect: <field>' header line"
    return found[0].strip()


@pytest.mark.parametrize("obj", [FULL_MODEL, FULL_DEPLOYMENT], ids=["EdgeModel", "EdgeDeployment"])
def test_full_objects_round_trip(obj):
    model = load(obj)
    assert model.to_dict() == obj
    assert type(load(model.to_dict())) is type(model)


def test_builtin_profiles_round_trip():
    for profile in builtin_profiles():
        assert HardwareProfile.model_validate(profile.to_dict()) == profile


def test_minimal_example_gets_defaults():
    objs = {o["kind"]: load(o) for o in (yaml.safe_load(p.read_text()) for p in EXAMPLES)}
    assert set(objs) == {"EdgeModel", "EdgeDeployment"}
    em, ed = objs["EdgeModel"], objs["EdgeDeployment"]
    assert isinstance(em, EdgeModel) and isinstance(ed, EdgeDeployment)
    assert em.spec.optimization.quantization == "auto"
    assert em.spec.optimization.sparsity == 0
    assert em.spec.target_profiles is None
    assert ed.spec.mode == "PerNode" and ed.spec.replicas is None
    assert ed.spec.rollout.max_unavailable == "25%" and ed.spec.rollout.auto_rollback is True
    assert ed.spec.runtime.port == 8080 and ed.spec.service.enabled is True
    assert ed.spec.model_ref.name == em.metadata["name"]


def test_snake_case_names_work_in_python():
    ed = EdgeDeployment(metadata={"name": "x"}, spec={"model_ref": {"name": "m"}, "mode": "Replicas", "replicas": 1})
    assert ed.to_dict()["spec"]["modelRef"] == {"name": "m"}


def test_load_dispatches_and_refuses_unknown():
    assert isinstance(load(FULL_MODEL), EdgeModel)
    with pytest.raises(ValueError, match="kind must be one of"):
        load({**FULL_MODEL, "kind": "Pod"})
    with pytest.raises(ValueError, match="apiVersion must be edgefleet.io/v1alpha1"):
        load({**FULL_MODEL, "apiVersion": "edgefleet.io/v1"})


def test_there_are_enough_invalid_manifests():
    assert len(INVALID) >= 25


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_rejected_naming_the_field(path):
    expect = expectation(path)
    with pytest.raises(ValidationError) as info:
        load(yaml.safe_load(path.read_text()))
    messages = format_errors(info.value)
    assert any(expect in m for m in messages), f"{path.name}: no error names {expect!r}: {messages}"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"modelRef": {"name": "m"}, "mode": "Replicas"},
         "spec.replicas: spec.replicas is required when mode is Replicas"),
        ({"modelRef": {"name": "m"}, "replicas": 2},
         "spec.replicas: spec.replicas is not allowed when mode is PerNode"),
        ({"modelRef": {"name": "m"}, "rollout": {"waves": [10, 50]}}, "spec.rollout.waves: rollout.waves must be"),
        ({"modelRef": {"name": "m"}, "rollout": {"maxUnavailable": "101%"}}, "spec.rollout.maxUnavailable: rollout"),
    ],
)
def test_rule_messages_are_worded_like_the_api_server(spec, message):
    with pytest.raises(ValidationError) as info:
        EdgeDeployment.model_validate({"spec": spec})
    assert any(m.startswith(message) for m in format_errors(info.value)), format_errors(info.value)


def test_static_int8_with_calibration_is_fine():
    spec = FULL_MODEL["spec"]
    ok = {**spec, "optimization": {"quantization": "static-int8", "calibration": {"uri": "https://d.example/c.npz"}}}
    EdgeModel.model_validate({"spec": ok})


def test_builtin_profiles_are_the_six():
    profiles = {p.metadata["name"]: p for p in builtin_profiles()}
    assert set(profiles) == {"cpu-amd64", "cpu-arm64", "nvidia-jetson", "nvidia-gpu", "coral-edgetpu", "intel-openvino"}
    cpu = max(profiles[n].spec.priority for n in ("cpu-amd64", "cpu-arm64"))
    for name in ("nvidia-jetson", "nvidia-gpu", "coral-edgetpu", "intel-openvino"):
        assert profiles[name].spec.priority > cpu, name
    for name in ("nvidia-jetson", "nvidia-gpu"):
        assert profiles[name].spec.extended_resources == {"nvidia.com/gpu": "1"}
        assert profiles[name].spec.target.precision == "fp16"
    for p in profiles.values():
        assert any(t.key == "node-role.kubernetes.io/edge" and t.effect == "NoSchedule"
                   for t in p.spec.tolerations), p.metadata["name"]
    coral = profiles["coral-edgetpu"].spec
    assert coral.privileged and [m.host_path for m in coral.device_mounts] == ["/dev/bus/usb"]
    assert (coral.target.format, coral.target.runtime, coral.target.delegate) == ("tflite", "litert", "libedgetpu.so.1")
    assert profiles["intel-openvino"].spec.target.runtime == "openvino"


# Labels of the kwok fleet's node classes (examples/fleets/default.yaml) -> expected profile.
FLEET = {
    "rpi4": ({"kubernetes.io/arch": "arm64", "node-role.kubernetes.io/edge": ""}, "cpu-arm64"),
    "jetson-orin-nano": ({"kubernetes.io/arch": "arm64", "node-role.kubernetes.io/edge": "",
                          "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-Jetson-Orin-Nano",
                          "nvidia.com/gpu.family": "ampere"}, "nvidia-jetson"),
    "gpu-server": ({"kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": "NVIDIA-L4",
                    "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI": "true"}, "nvidia-gpu"),
    "coral-box": ({"kubernetes.io/arch": "amd64", "node-role.kubernetes.io/edge": "",
                   "feature.node.kubernetes.io/usb-fe_1a6e_089a.present": "true"}, "coral-edgetpu"),
    "intel-nuc": ({"kubernetes.io/arch": "amd64", "node-role.kubernetes.io/edge": "",
                   "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI": "true"}, "intel-openvino"),
    "plain-amd64": ({"kubernetes.io/arch": "amd64", "node-role.kubernetes.io/edge": ""}, "cpu-amd64"),
    "legacy-armv7": ({"kubernetes.io/arch": "arm", "node-role.kubernetes.io/edge": ""}, None),
}


@pytest.mark.parametrize("node", FLEET)
def test_builtin_profiles_classify_the_fleet(node):
    labels, expected = FLEET[node]
    winner = best_profile(builtin_profiles(), labels)
    assert (winner.metadata["name"] if winner else None) == expected


def test_fleet_file_labels_match_this_table():
    fleet_file = REPO / "examples" / "fleets" / "default.yaml"
    if not fleet_file.exists():
        pytest.skip("no fleet file")
    classes = {c["name"]: c["labels"] for c in yaml.safe_load(fleet_file.read_text())["classes"]}
    for name, (_, expected) in FLEET.items():
        if name in classes:
            winner = best_profile(builtin_profiles(), classes[name])
            assert (winner.metadata["name"] if winner else None) == expected, name
