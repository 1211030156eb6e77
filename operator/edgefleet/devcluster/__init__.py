"""A real local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler) with a kwok
edge fleet and a CNCF distribution OCI registry, built from the components' Go modules."""

from .cluster import Cluster, ClusterError, down, is_running, session_cluster, status, up
from .components import BuildError
from .fleet import FleetError, load_fleet

__all__ = [
    "BuildError", "Cluster", "ClusterError", "FleetError", "down", "is_running", "load_fleet",
    "session_cluster", "status", "up",
]
