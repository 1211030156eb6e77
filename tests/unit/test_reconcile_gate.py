"""spec.rollout.gate in the EdgeDeployment reconciler (in-memory fake of the one writer): a class waits for
its variant's on-target numbers (EdgeModel status.variants[].onTarget), a variant too slow on target is
held back with the numbers in a Degraded condition while the old one keeps serving, a good one rolls out."""

from __future__ import annotations

import pytest
from edgefleet.api import builtin_profiles
from edgefleet.reconcile import World, reconcile_deployment
from edgefleet.settings import Settings
from fake_kube import FakeKube

NS = "shop"
OLD = "sha256:" + "ab" * 32
NEW = "sha256:" + "cd" * 32
NODES = {"rpi-0": {"kubernetes.io/arch": "arm64"}, "rpi-1": {"kubernetes.io/arch": "arm64"}}
GATE = {"maxLatencyP95Ms": 2.0, "minThroughput": 100, "maxMemoryBytes": 256 << 20}
FAST = {"node": "rpi-0", "latencyP95Ms": 1.5, "latencyP95MsN": 0.9, "threads": 4, "throughputPerSecond": 800.0,
        "peakMemoryBytes": 90 << 20}
SLOW = {**FAST, "latencyP95Ms": 7.5, "latencyP95MsN": 4.25}


def variant(digest: str, on_target: dict | None) -> dict:
    v = {"profile": "cpu-arm64", "state": "Ready", "format": "onnx", "precision": "int8", "digest": digest,
         "artifact": f"oci://registry.local/edgefleet@{digest}"}
    return {**v, "onTarget": on_target} if on_target else v


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx"},
              "status": {"variants": [variant(OLD, None)]}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": NS, "generation": 1},
              "spec": {"modelRef": {"name": "digits"}, "rollout": {"gate": GATE}}})
    return fake


def reconcile(kube) -> None:
    reconcile_deployment(kube, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))


def set_variant(kube, digest: str, on_target: dict | None) -> None:
    kube.set_status("EdgeModel", "digits", NS, {"variants": [variant(digest, on_target)]})


def served(kube) -> str | None:
    ds = kube.stored("DaemonSet", "digits-cpu-arm64", NS)
    return ds and ds["spec"]["template"]["metadata"]["annotations"]["edgefleet.io/variant-digest"]


def condition(kube, type_: str) -> dict:
    return next(c for c in kube.stored("EdgeDeployment", "digits", NS)["status"]["conditions"] if c["type"] == type_)


def class_message(kube) -> str:
    (c,) = kube.stored("EdgeDeployment", "digits", NS)["status"]["classes"]
    return c.get("message", "")


def test_first_rollout_waits_for_on_target_numbers_then_goes(kube):
    reconcile(kube)
    assert served(kube) is None  # nothing measured on target yet: nothing rolled out
    assert "waiting for the on-target benchmark" in class_message(kube)
    assert condition(kube, "Progressing")["status"] == "True"
    assert condition(kube, "Degraded")["status"] == "False"
    set_variant(kube, OLD, FAST)
    reconcile(kube)
    assert served(kube) == OLD
    assert "rollout gate" not in class_message(kube)


def test_too_slow_on_target_is_held_with_the_numbers_and_the_old_variant_keeps_serving(kube):
    set_variant(kube, OLD, FAST)
    reconcile(kube)
    assert served(kube) == OLD
    set_variant(kube, NEW, SLOW)  # a recompile whose variant is slow on this class's node
    reconcile(kube)
    assert served(kube) == OLD
    degraded = condition(kube, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "GateFailed"
    # the runtime serves with the backend's default threads: the N-thread p95 counts
    assert "p95 latency 4.25 ms on rpi-0 exceeds maxLatencyP95Ms 2" in degraded["message"]
    assert "keeps serving its previous variant" in degraded["message"]
    assert any(e["reason"] == "GateFailed" and e["type"] == "Warning" for e in kube.events)
    set_variant(kube, NEW, {**SLOW, "latencyP95MsN": 1.0})  # measured again, now inside the gate
    reconcile(kube)
    assert served(kube) == NEW
    assert condition(kube, "Degraded")["status"] == "False"


def test_failed_measurement_and_memory_and_throughput_limits(kube):
    set_variant(kube, OLD, {**FAST, "error": "onnxruntime cannot load it"})
    reconcile(kube)
    assert served(kube) is None and "could not be measured on rpi-0" in condition(kube, "Degraded")["message"]
    set_variant(kube, OLD, {**FAST, "peakMemoryBytes": 300 << 20, "throughputPerSecond": 50.0})
    reconcile(kube)
    message = condition(kube, "Degraded")["message"]
    assert "peak memory 314572800 bytes on rpi-0 exceeds maxMemoryBytes 268435456" in message
    assert "throughput 50.0/s on rpi-0 is below minThroughput 100" in message


def test_no_gate_rolls_out_without_on_target_numbers(kube):
    ed = kube.stored("EdgeDeployment", "digits", NS)
    ed["spec"]["rollout"] = {}
    reconcile(kube)
    assert served(kube) == OLD


def test_a_host_measured_model_cannot_pass_a_gate_and_says_why(kube):
    em = kube.stored("EdgeModel", "digits", NS)
    em["spec"]["optimization"] = {"selection": "host"}
    reconcile(kube)
    assert served(kube) is None
    degraded = condition(kube, "Degraded")
    assert degraded["reason"] == "GateFailed" and "optimization.selection host" in degraded["message"]
