"""Every request the operator makes to its artifact store has a deadline: a registry that accepts connections
and never answers fails the operation within it (ORAS alone waits forever and retries for over two minutes)."""

from __future__ import annotations

import socket
import time

import pytest
from edgefleet.artifacts import OCIStore, StoreError


@pytest.fixture
def silent_registry():
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        yield f"127.0.0.1:{srv.getsockname()[1]}"


@pytest.mark.parametrize("operation", ["get", "put"])
def test_a_registry_that_never_answers_fails_the_operation_within_its_deadline(silent_registry, operation):
    store = OCIStore(silent_registry, "edgefleet/models", insecure=True, operation_seconds=2.0)
    started = time.monotonic()
    with pytest.raises(StoreError):
        if operation == "get":
            store.get(f"oci://{silent_registry}/edgefleet/models:report", "")
        else:
            store.put(b"model", name="digits", media_type="application/octet-stream")
    assert time.monotonic() - started < 8.0  # the 2 s deadline, plus the last request's own bound


def test_products_make_registry_clients_in_one_place_only():
    """Every registry request of the operator, compiler and runtime goes through
    edgefleet_runtime.fetch.registry_client (timeouts, bounded retries, one plain-HTTP rule): no other module
    builds an ORAS client."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    makers = re.compile(r"OrasClient\(|oras\.client\b|Registry\(hostname=|class \w+\(oras\.provider\.Registry\)")
    found = {str(p.relative_to(root)) for base in ("operator/edgefleet", "runtime-image/edgefleet_runtime")
             for p in (root / base).rglob("*.py") if makers.search(p.read_text())}
    assert found == {"runtime-image/edgefleet_runtime/fetch.py"}, found
