"""Unit tests reconcile one namespace and name over and over, changing pods in between as if time had passed:
each reconcile reads the pods afresh (the throttle itself is tested in test_reconcile_pod_reads.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_pod_reads(monkeypatch):
    from edgefleet.reconcile import deployment

    monkeypatch.setattr(deployment, "POD_READS", deployment.PodReads(seconds=0))
