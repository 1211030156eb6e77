"""The demo's per-class table says why a class's pods are not ready (the EdgeDeployment's class message)."""

from __future__ import annotations

from edgefleet_dev.demo import print_tables

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


def test_this_machine_line_names_the_real_node_pod_or_the_host_process():
    lines: list[str] = []
    print_tables([], {**HERE, "profile": "intel-openvino", "pod": "digits-intel-openvino-x", "node": "vm"},
                 echo=lines.append)
    assert lines[-1].strip() == ("== this machine (intel-openvino; pod digits-intel-openvino-x on the real node vm, "
                                 "200 requests): top-1 97.0%, p50 1.20 ms over HTTP")
    lines.clear()
    print_tables([], HERE, echo=lines.append)
    assert "(cpu-amd64; a host process, 200 requests)" in lines[-1]


def test_the_demo_says_why_it_has_no_real_node(monkeypatch):
    from edgefleet_dev import demo
    from edgefleet_dev.images import sync

    monkeypatch.setenv("EDGEFLEET_REAL_NODE", "0")
    assert demo.real_node_reason("anything") == "EDGEFLEET_REAL_NODE=0"
    monkeypatch.setenv("EDGEFLEET_REAL_NODE", "1")
    monkeypatch.setattr(demo.dc, "real_node_skip_reason", lambda name: None)
    monkeypatch.setattr(sync, "unbuilt", lambda: ["compiler"])
    assert demo.real_node_reason("x") == "images not built (compiler); run `edgefleet images build`"
