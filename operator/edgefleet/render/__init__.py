"""Pure rendering: spec + profiles + nodes -> placement decisions and Kubernetes manifests. No I/O."""

from .placement import higher_priority, node_affinity, resolve_nodes
from .workload import (
    TEMPLATE_HASH,
    child_labels,
    child_name,
    render_class,
    render_service,
    split_replicas,
    template_hash,
    waves_of,
)

__all__ = [
    "TEMPLATE_HASH", "child_labels", "child_name", "higher_priority", "node_affinity", "render_class",
    "render_service", "resolve_nodes", "split_replicas", "template_hash", "waves_of",
]
