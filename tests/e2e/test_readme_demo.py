"""End to end, as README.md tells a user: a fresh cluster, `helm install` of the chart, the quickstart
applied with kubectl, every class served, this machine's variant answering real requests, and a clean
`helm uninstall`."""

from __future__ import annotations

import json

import pytest
from edgefleet_dev.demo import run_demo
from edgefleet_dev.devcluster import cluster as dc

pytestmark = pytest.mark.cluster
NAME = "e2e-readme"


@pytest.fixture
def fresh_cluster_name():
    """A cluster of its own: the chart must own its CRDs, which the session cluster's tests applied."""
    dc.down(NAME, echo=lambda _: None)
    yield NAME
    dc.down(NAME, echo=lambda _: None)


def test_demo_installs_serves_and_uninstalls(fresh_cluster_name):
    rows, here = run_demo(fresh_cluster_name, echo=print, timeout=600)
    served = [r for r in rows if r["state"] == "Ready"]
    assert {r["class"] for r in served} >= {"cpu-arm64", "cpu-amd64", "nvidia-jetson", "nvidia-gpu"}
    for row in served:
        assert row["podsReady"] == f"{row['nodes']}/{row['nodes']}", row
        assert row["sizeBytes"] > 0 and row["accuracyDelta"] is not None
    assert any(r["class"] == "(no profile)" for r in rows)
    assert here["requests"] == 200 and here["accuracy"] >= 0.95, here

    cluster = dc.Cluster(dc.state_dir(fresh_cluster_name))
    cluster.helm("uninstall", "edgefleet", "--namespace", "edgefleet-system", "--wait")
    left = json.loads(cluster.kubectl("get", "deployments,serviceaccounts,roles,rolebindings", "-n",
                                      "edgefleet-system", "-l", "app.kubernetes.io/instance=edgefleet",
                                      "-o", "json").stdout)["items"]
    assert not left, [o["metadata"]["name"] for o in left]
    cluster_scoped = cluster.kubectl("get", "clusterroles,clusterrolebindings", "-l",
                                     "app.kubernetes.io/instance=edgefleet", "-o", "name").stdout.split()
    assert not cluster_scoped
    # CRDs (and with them the user's models) are kept: helm.sh/resource-policy: keep
    assert cluster.kubectl("get", "crd", "edgemodels.edgefleet.io", check=False).returncode == 0
    assert cluster.kubectl("get", "edgemodel", "digits", "-n", "edgefleet-demo", check=False).returncode == 0
