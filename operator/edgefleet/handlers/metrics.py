"""The operator's Prometheus metrics, served on EDGEFLEET_METRICS_PORT (0 turns them off)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("edgefleet_reconcile_total", "Reconciles by kind and result.", ["kind", "result"])
RECONCILE_SECONDS = Histogram("edgefleet_reconcile_seconds", "Time per reconcile.", ["kind"],
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
QUEUE_DEPTH = Gauge("edgefleet_queue_dirty", "Objects waiting for a reconcile.", ["kind"])
FLEET_NODES = Gauge("edgefleet_fleet_nodes", "Nodes the operator sees.")


_serving: set[int] = set()


def serve(port: int) -> None:
    """Start the /metrics endpoint once per port (a retried start-up must not bind it twice)."""
    if port and port not in _serving:
        start_http_server(port)
        _serving.add(port)
