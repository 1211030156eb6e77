"""The test session refuses a reused cluster whose accelerators other workloads hold (README order: the
demo's pods keep the GPU kwok nodes busy)."""

from __future__ import annotations

import json
import subprocess

from kube_helpers import foreign_accelerator_pods


class PodList:
    """A cluster whose `kubectl get pods -A -o json` answers `pods`."""

    def __init__(self, pods: list[dict]):
        self.pods = pods

    def kubectl(self, *args, **_):
        assert args == ("get", "pods", "-A", "-o", "json")
        return subprocess.CompletedProcess(args, 0, json.dumps({"items": self.pods}), "")


def pod(namespace: str, name: str, requests: dict, phase: str = "Running", deleting: bool = False) -> dict:
    meta = {"namespace": namespace, "name": name, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    return {"metadata": meta, "spec": {"containers": [{"name": "c", "resources": {"requests": requests}}]},
            "status": {"phase": phase}}


def test_only_live_pods_of_others_that_hold_extended_resources_count():
    gpu = {"cpu": "100m", "nvidia.com/gpu": "1"}
    pods = [pod("edgefleet-demo", "digits-nvidia-gpu-x", gpu),
            pod("edgefleet-demo", "digits-cpu-arm64-y", {"cpu": "1"}),
            pod("t-1234abcd", "digits-nvidia-gpu-z", gpu), pod("other", "done", gpu, phase="Succeeded"),
            pod("other", "leaving", gpu, deleting=True), pod("lab", "tpu", {"google.com/tpu": "4"}, phase="Pending")]
    assert foreign_accelerator_pods(PodList(pods)) == ["edgefleet-demo/digits-nvidia-gpu-x (nvidia.com/gpu)",
                                                       "lab/tpu (google.com/tpu)"]
    assert foreign_accelerator_pods(PodList([])) == []
