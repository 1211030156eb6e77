"""Kill the operator (SIGKILL) in the middle of a rollout and start it again: it converges with no
duplicate and no orphaned object."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from kube_helpers import get, items, wait_for
from operator_helpers import converged, placement, quickstart_into, ready_variants, untolerated, why_not

pytestmark = pytest.mark.cluster


def start_operator(cluster, log):
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "EDGEFLEET_ARTIFACT_STORE": f"oci://{cluster.registry}/edgefleet-test",
           "EDGEFLEET_ARTIFACT_INSECURE": "true", "EDGEFLEET_COMPILE_TIMING_RUNS": "10"}
    return subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "operator", "--liveness", ""],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def test_operator_killed_mid_rollout_converges_without_duplicates(edgefleet_api, namespace, tmp_path):
    cluster = edgefleet_api
    with open(tmp_path / "operator.log", "wb") as log:
        first = start_operator(cluster, log)
        try:
            quickstart_into(cluster, namespace)
            wait_for(lambda: items(cluster, namespace, "daemonsets", "-l", "edgefleet.io/deployment=digits"),
                     timeout=120, what="the rollout to start")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        second = start_operator(cluster, log)
        try:
            served, variants, ed = wait_for(lambda: converged(cluster, namespace), timeout=180,
                                            what=why_not(namespace, "convergence after the restart"))
        finally:
            second.terminate()
            assert second.wait(30) == 0, (tmp_path / "operator.log").read_text()[-3000:]

    want = placement(cluster)
    classes = {p for n, p in want.items() if p in variants}
    daemonsets = items(cluster, namespace, "daemonsets")
    names = Counter(d["metadata"]["labels"]["edgefleet.io/profile"] for d in daemonsets)
    assert names == Counter(classes), "one DaemonSet per served class, nothing else"
    uid = ed["metadata"]["uid"]
    for obj in daemonsets + items(cluster, namespace, "services"):
        owners = obj["metadata"].get("ownerReferences", [])
        assert [(o["uid"], o["controller"]) for o in owners] == [(uid, True)], obj["metadata"]["name"]
    em = get(cluster, namespace, "edgemodel", "digits")
    profiles = [v["profile"] for v in em["status"]["variants"]]
    assert len(profiles) == len(set(profiles))
    assert ready_variants(cluster, namespace) == variants
    pods = items(cluster, namespace, "pods")
    assert len(pods) == len(served) == sum(1 for n, p in want.items() if p in variants) - len(
        {n for n in untolerated(cluster, want) if want[n] in variants})
