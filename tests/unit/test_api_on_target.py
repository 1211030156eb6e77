"""API for on-target selection and the rollout gate: pydantic, CRD schema and CEL agree."""

from __future__ import annotations

import pytest
import yaml
from edgefleet.api.crdgen import render_all
from edgefleet.api.models import EdgeDeploymentSpec, EdgeModelSpec, OnTargetResult, RolloutGate, Variant
from pydantic import ValidationError

GENERATED = render_all()


def crd(plural: str) -> dict:
    return yaml.safe_load(GENERATED[f"{plural}.edgefleet.io.yaml"])


def prop(plural: str, dotted: str) -> dict:
    node = crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in dotted.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node

MODEL = {"source": {"uri": "oci://r/m:1"}, "format": "onnx"}
DEPLOYMENT = {"modelRef": {"name": "digits"}}


def test_selection_is_host_or_on_target_and_optional():
    assert EdgeModelSpec.model_validate(MODEL).optimization.selection is None
    spec = EdgeModelSpec.model_validate({**MODEL, "optimization": {"selection": "onTarget"}})
    assert spec.optimization.selection == "onTarget"
    with pytest.raises(ValidationError, match="selection"):
        EdgeModelSpec.model_validate({**MODEL, "optimization": {"selection": "device"}})
    assert prop("edgemodels", "spec.optimization.selection")["enum"] == ["host", "onTarget"]


def test_variant_carries_on_target_numbers_and_node():
    v = Variant.model_validate({"profile": "cpu-amd64", "onTarget": {
        "node": "edge-1", "latencyP50Ms": 0.04, "latencyP95Ms": 0.05, "threads": 4, "latencyP50MsN": 0.03,
        "latencyP95MsN": 0.04, "throughputPerSecond": 5000.0, "peakMemoryBytes": 80_000_000, "accuracy": 0.98}})
    assert v.on_target.node == "edge-1" and v.on_target.latency_p95_ms_n == 0.04
    dumped = v.model_dump(by_alias=True, exclude_none=True)["onTarget"]
    assert dumped["latencyP95MsN"] == 0.04 and dumped["peakMemoryBytes"] == 80_000_000
    with pytest.raises(ValidationError, match="node"):
        OnTargetResult.model_validate({"latencyP50Ms": 1.0})
    with pytest.raises(ValidationError):
        OnTargetResult.model_validate({"node": "n", "accuracy": 1.5})
    schema = prop("edgemodels", "status.variants.[].onTarget")
    assert schema["required"] == ["node"] and "latencyP95MsN" in schema["properties"]


def test_gate_needs_one_limit_and_positive_numbers():
    spec = EdgeDeploymentSpec.model_validate(
        {**DEPLOYMENT, "rollout": {"gate": {"maxLatencyP95Ms": 5, "minThroughput": 100, "maxMemoryBytes": 1 << 28}}})
    assert spec.rollout.gate == RolloutGate(max_latency_p95_ms=5, min_throughput=100, max_memory_bytes=1 << 28)
    with pytest.raises(ValidationError, match="set at least one of maxLatencyP95Ms"):
        EdgeDeploymentSpec.model_validate({**DEPLOYMENT, "rollout": {"gate": {}}})
    for bad in ({"maxLatencyP95Ms": 0}, {"minThroughput": -1}, {"maxMemoryBytes": 0}, {"maxLatencyMs": 1}):
        with pytest.raises(ValidationError):
            EdgeDeploymentSpec.model_validate({**DEPLOYMENT, "rollout": {"gate": bad}})
    gate = prop("edgedeployments", "spec.rollout.gate")
    assert [r["rule"] for r in gate["x-kubernetes-validations"]] == [
        "has(self.maxLatencyP95Ms) || has(self.minThroughput) || has(self.maxMemoryBytes)"]
    assert gate["properties"]["maxLatencyP95Ms"]["exclusiveMinimum"] is True
