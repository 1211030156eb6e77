"""Shared fixtures: the local control plane (session scope) and a fresh namespace per test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster() -> Iterator[edgefleet.devcluster.Cluster]:  # noqa: F821
    """The local control plane: reused when EDGEFLEET_KUBECONFIG names a running one, else started."""
    from edgefleet.devcluster import session_cluster

    with session_cluster() as c:
        yield c


@pytest.fixture
def namespace(cluster) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"namespace {name}: the default ServiceAccount never appeared"
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
