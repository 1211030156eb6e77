"""The demo's per-class table says why a class's pods are not ready (the EdgeDeployment's class message)."""

from __future__ import annotations

from edgefleet.demo import print_tables

ROW = {"class": "nvidia-jetson", "nodes": 2, "variant": "onnx/fp16 fp16", "sizeBytes": 2048, "latencyP50Ms": 0.5,
       "accuracyDelta": 0.0, "podsReady": "0/2", "state": "Ready", "why": ""}
HERE = {"profile": "cpu-amd64", "requests": 200, "accuracy": 0.97, "p50Ms": 1.2}


def table(row: dict) -> list[str]:
    lines: list[str] = []
    print_tables([row], HERE, echo=lines.append)
    return [line.strip() for line in "\n".join(lines).splitlines()]


def test_pending_pods_reason_is_printed_and_absent_when_all_is_well():
    stuck = table({**ROW, "podsWhy": "2/2 pods Pending: Insufficient nvidia.com/gpu"})
    assert "pods            2/2 pods Pending: Insufficient nvidia.com/gpu" in stuck
    assert not [line for line in table({**ROW, "podsWhy": ""}) if line.startswith("pods  ")]
