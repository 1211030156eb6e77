"""Fields that end up in a Pod, DaemonSet or Deployment follow the rules Kubernetes applies to them:
the edge cases Kubernetes accepts are accepted here too (tests/data/invalid/ holds the refusals)."""

from __future__ import annotations

import copy

import pytest
from edgefleet.api import EdgeDeployment, HardwareProfile, format_errors
from pydantic import ValidationError

PROFILE = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "HardwareProfile", "metadata": {"name": "p"},
           "spec": {"nodeSelector": {"matchLabels": {"kubernetes.io/arch": "amd64"}},
                    "target": {"format": "onnx", "precision": "int8", "runtime": "onnxruntime"},
                    "runtimeImage": "ghcr.io/edgefleet/runtime-cpu:0.1.0"}}


def profile(**spec) -> dict:
    obj = copy.deepcopy(PROFILE)
    obj["spec"].update(spec)
    return obj


def errors(obj: dict, cls=HardwareProfile) -> list[str]:
    try:
        cls.model_validate(obj)
    except ValidationError as err:
        return format_errors(err)
    return []


@pytest.mark.parametrize("image", [
    "ghcr.io/edgefleet/runtime-cpu:0.1.0", "registry.local:5000/edgefleet/runtime-cpu:0.1.0-RC1",
    "localhost/runtime", "runtime", "[::1]:5000/edgefleet/runtime:dev",
    "ghcr.io/edgefleet/runtime-cpu@sha256:" + "a" * 64, "ghcr.io/edgefleet/runtime_cpu:1.0@sha256:" + "b" * 64,
    "Registry.Example.COM/team/runtime:latest",
])
def test_image_references_kubernetes_pulls_are_accepted(image):
    assert errors(profile(runtimeImage=image)) == []


@pytest.mark.parametrize("image", ["ghcr.io/edgefleet/Runtime:1", "ghcr.io/edgefleet/runtime:", "runtime:1:2",
                                   "ghcr.io//runtime", "https://ghcr.io/edgefleet/runtime", "runtime@sha256:abc"])
def test_image_references_a_runtime_cannot_parse_are_refused(image):
    assert any(e.startswith("spec.runtimeImage: runtimeImage must be an image reference") for e in
               errors(profile(runtimeImage=image)))


@pytest.mark.parametrize("key, ok", [
    ("a" * 63, True), ("a" * 64, False), ("example.com/" + "a" * 63, True), ("example.com/" + "a" * 64, False),
    ("a" * 253 + "/x", True), ("a" * 254 + "/x", False), ("feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI", True),
    ("Example.com/x", False), ("example.com/", False), ("/x", False), ("x_y.z-1", True), ("-x", False),
])
def test_label_keys_follow_kubernetes(key, ok):
    as_label = errors(profile(nodeSelector={"matchLabels": {key: "v"}}))
    as_expression = errors(profile(nodeSelector={"matchExpressions": [{"key": key, "operator": "Exists"}]}))
    as_taint = errors(profile(tolerations=[{"key": key, "operator": "Exists"}]))
    assert (as_label == []) is ok and (as_expression == []) is ok and (as_taint == []) is ok, (
        as_label, as_expression, as_taint)


@pytest.mark.parametrize("toleration", [
    {"operator": "Exists"}, {"key": "", "operator": "Exists"},
    {"key": "node-role.kubernetes.io/edge", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "zone", "value": "eu-west", "effect": "NoExecute", "tolerationSeconds": 30},
    {"key": "dedicated", "operator": "Equal", "value": ""},
])
def test_tolerations_kubernetes_accepts(toleration):
    assert errors(profile(tolerations=[toleration])) == []


@pytest.mark.parametrize("name, ok", [
    ("nvidia.com/gpu", True), ("gpu.intel.com/i915", True), ("example.com/fpga-a10_x.y", True),
    ("gpu", False), ("kubernetes.io/gpu", False), ("node.kubernetes.io/x", False), ("a" * 245 + "/x", False),
])
def test_extended_resource_names(name, ok):
    assert (errors(profile(extendedResources={name: "1"})) == []) is ok


def test_device_mounts_at_distinct_paths_are_fine():
    mounts = [{"name": "a", "hostPath": "/dev/apex_0", "mountPath": "/dev/apex_0"},
              {"name": "b", "hostPath": "/dev/apex_0", "mountPath": "/dev/apex_1"},
              {"name": "c" * 59, "hostPath": "/dev/..bus/usb", "mountPath": "/var/lib/edgefleet/cache-x"}]
    assert errors(profile(deviceMounts=mounts)) == []


@pytest.mark.parametrize("target, ok", [
    ({"format": "onnx", "precision": "fp16", "runtime": "onnxruntime", "executionProvider": "openvino"}, True),
    ({"format": "openvino", "precision": "int8", "runtime": "openvino"}, True),
    ({"format": "tflite", "precision": "int8", "runtime": "litert", "delegate": "libedgetpu.so.1"}, True),
    ({"format": "tflite", "precision": "fp16", "runtime": "litert", "delegate": "libnnapi.so"}, True),
    ({"format": "onnx", "precision": "fp32", "runtime": "openvino"}, False),
    ({"format": "coreml", "precision": "fp16", "runtime": "onnxruntime"}, False),
    ({"format": "openvino", "precision": "int8", "runtime": "onnxruntime"}, False),
])
def test_format_runtime_pairs(target, ok):
    found = errors(profile(target=target))
    assert (found == []) is ok, found
    assert ok or any(e.startswith("spec.target.runtime: ") and "make target.format and target.runtime agree" in e
                     for e in found)


@pytest.mark.parametrize("name, service, ok", [
    ("digits", True, True), ("a" * 63, True, True), ("a" * 64, False, False), ("digits.v2", False, True),
    ("digits.v2", True, False), ("2digits", True, False), ("2digits", False, True),
])
def test_edge_deployment_names_fit_labels_and_the_service(name, service, ok):
    obj = {"metadata": {"name": name}, "spec": {"modelRef": {"name": "m"}, "service": {"enabled": service}}}
    found = errors(obj, EdgeDeployment)
    assert (found == []) is ok, found
    assert ok or all(e.startswith("metadata.name: ") for e in found)


@pytest.mark.parametrize("value, ok", [(1, True), ("1%", True), ("100%", True), (0, False), ("0%", False)])
def test_max_unavailable_is_never_zero(value, ok):
    obj = {"metadata": {"name": "d"}, "spec": {"modelRef": {"name": "m"}, "rollout": {"maxUnavailable": value}}}
    assert (errors(obj, EdgeDeployment) == []) is ok
