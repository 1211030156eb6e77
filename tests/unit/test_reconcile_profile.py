"""HardwareProfile status against the in-memory fake writer: node counts, and a spec the models refuse is
reported on the profile (it places nothing) instead of only in the operator's log."""

from __future__ import annotations

from edgefleet.api import builtin_profiles
from edgefleet.reconcile import World, reconcile_profile
from fake_kube import FakeKube

NODES = {"pi-0": {"kubernetes.io/arch": "arm64"}, "pi-1": {"kubernetes.io/arch": "arm64"}}


def conditions(kube) -> dict[str, dict]:
    return {c["type"]: c for c in kube.stored("HardwareProfile", "cpu-arm64")["status"]["conditions"]}


def test_invalid_profile_is_reported_then_recovers():
    kube = FakeKube()
    good = next(p for p in builtin_profiles() if p.metadata["name"] == "cpu-arm64").to_dict()
    kube.add(good)
    reconcile_profile(kube, "cpu-arm64", World(NODES, builtin_profiles()))
    assert kube.stored("HardwareProfile", "cpu-arm64")["status"]["matchedNodes"] == 2
    assert conditions(kube)["Ready"]["status"] == "True"

    bad = kube.stored("HardwareProfile", "cpu-arm64")
    bad["spec"]["target"] = {"format": "tflite", "precision": "int8", "runtime": "onnxruntime"}
    others = [p for p in builtin_profiles() if p.metadata["name"] != "cpu-arm64"]  # World skips the invalid one
    for _ in range(2):
        reconcile_profile(kube, "cpu-arm64", World(NODES, others))
    conds = conditions(kube)
    assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("False", "InvalidSpec")
    assert conds["Degraded"]["message"].startswith("spec.target.runtime: ")
    assert kube.stored("HardwareProfile", "cpu-arm64")["status"]["matchedNodes"] == 0
    assert [e["reason"] for e in kube.warnings()] == ["InvalidSpec"]

    bad["spec"]["target"] = good["spec"]["target"]
    reconcile_profile(kube, "cpu-arm64", World(NODES, builtin_profiles()))
    conds = conditions(kube)
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "False"
    assert kube.stored("HardwareProfile", "cpu-arm64")["status"]["matchedNodes"] == 2
