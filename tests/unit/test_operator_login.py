"""The operator in a pod finds the API server as client-go does: from KUBERNETES_SERVICE_HOST/PORT, which the
kubelet sets in every pod, not from the name kubernetes.default.svc (a cluster need not run DNS)."""

from __future__ import annotations

from edgefleet.handlers import in_cluster_server


def test_server_from_the_service_environment():
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster_server(env) == "https://10.96.0.1:443"
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.0.0.9", "KUBERNETES_SERVICE_PORT": "6443"}) == \
        "https://10.0.0.9:6443"


def test_ipv6_host_is_bracketed_and_port_defaults_to_443():
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00::1"}) == "https://[fd00::1]:443"


def test_outside_a_pod_there_is_none():
    assert in_cluster_server({}) is None
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": ""}) is None
