"""A real local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler) with a kwok
edge fleet and a CNCF distribution OCI registry (token authentication, registry_front.py), built from the
components' Go modules; optionally this machine as one real node (containerd, runc, CNI, kubelet, kube-proxy)
that runs real pods."""

from ..toolchain import BuildError
from .cluster import (
    Cluster,
    ClusterError,
    down,
    is_running,
    real_node_skip_reason,
    start_registry,
    status,
    stop_real_node,
    stop_registry,
    up,
)
from .fleet import FleetError, load_fleet
from .node import NodeError

__all__ = [
    "BuildError", "Cluster", "ClusterError", "FleetError", "NodeError", "down", "is_running", "load_fleet",
    "real_node_skip_reason", "start_registry", "status", "stop_real_node", "stop_registry", "up",
]
