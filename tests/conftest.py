"""Shared fixtures: the local control plane (session scope) and a fresh namespace per test."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgefleet_dev.net import free_port

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"
PROFILES = REPO / "operator" / "edgefleet" / "profiles"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for kube_helpers


TEST_CLUSTER = "test"  # the session's own cluster; `edgefleet demo` and `cluster up` use "default"


@pytest.fixture(scope="session")
def cluster() -> Iterator[edgefleet_dev.devcluster.Cluster]:  # noqa: F821
    """The local control plane: the one EDGEFLEET_CLUSTER names (started when it is down, and left running: other
    sessions share it), else a cluster of the session's own (named "test", never the demo's), started now and
    stopped afterwards. A reused cluster
    must not hold other workloads' accelerators: the GPU tests would wait for them until they time out."""
    from edgefleet_dev.devcluster import is_running
    from edgefleet_dev.stack import session_cluster
    from kube_helpers import foreign_accelerator_pods

    shared = "EDGEFLEET_CLUSTER" in os.environ  # named by the user: other sessions may use it, it stays up
    os.environ.setdefault("EDGEFLEET_CLUSTER", TEST_CLUSTER)
    reused = is_running(os.environ["EDGEFLEET_CLUSTER"])
    with session_cluster(stop=not shared) as c:
        if reused and (held := foreign_accelerator_pods(c)):
            pytest.exit(f"cluster {os.environ['EDGEFLEET_CLUSTER']!r} runs pods of other workloads that hold "
                        f"accelerators ({', '.join(held[:5])}); the tests need those nodes. Run the tests on a "
                        f"cluster of their own (unset EDGEFLEET_CLUSTER) or remove those workloads "
                        f"(e.g. kubectl delete namespace edgefleet-demo)", returncode=3)
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


@pytest.fixture(scope="session")
def edgefleet_api(cluster):
    """The cluster with edgefleet's CRDs and built-in HardwareProfiles applied."""
    result = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    assert "Warning" not in result.stderr, result.stderr
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *[f"crd/{p.name.removesuffix('.yaml')}" for p in CRDS.glob("*.yaml")])
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "hwp", check=False).returncode != 0:  # discovery lags behind Established
        assert time.monotonic() < deadline, "the HardwareProfile kind never became servable"
        time.sleep(0.5)
    result = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PROFILES))
    assert "Warning" not in result.stderr, result.stderr
    return cluster


@pytest.fixture(scope="module")
def operator(edgefleet_api, tmp_path_factory):
    """The operator in a thread (kopf.testing.KopfRunner), storing variants in the cluster's registry."""
    from kopf.testing import KopfRunner

    env = {
        "KUBECONFIG": str(edgefleet_api.kubeconfig),
        "EDGEFLEET_ARTIFACT_STORE": f"oci://{edgefleet_api.registry}/edgefleet-test",
        "EDGEFLEET_ARTIFACT_INSECURE": "true",
        "EDGEFLEET_RESYNC_SECONDS": "20",
        "EDGEFLEET_COMPILE_TIMING_RUNS": "10",
        "EDGEFLEET_METRICS_PORT": str(free_port()),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # cluster-wide: with a namespace pattern ("!rn-*", to leave the real-node modules' namespaces to their own
        # operators) Kopf starts watchers per namespace it observes, and once, in a CI run right after the e2e
        # modules, it never watched a namespace made after its start (no EdgeModel event in 180 s). Run those
        # modules and these at different times: two operators on one EdgeModel overwrite each other's status.
        with KopfRunner(["run", "--all-namespaces", "--standalone", "-m", "edgefleet.handlers"],
                        timeout=60) as runner:
            runner.metrics_url = f"http://127.0.0.1:{env['EDGEFLEET_METRICS_PORT']}/metrics"
            yield runner
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert runner.exit_code == 0, runner.output


@pytest.fixture(scope="session")
def real_node(edgefleet_api) -> dict[str, str]:
    """The session cluster's real node with edgefleet's built images in the cluster's registry (pushed only when
    it lacks them); returns image name -> digest. Skips with the reason where the host cannot run a real node,
    the cluster has none, or the images are not built."""
    from edgefleet_dev.images.sync import sync, unbuilt
    from real_node_helpers import skip_reason

    if reason := skip_reason(edgefleet_api, unbuilt()):
        pytest.skip(reason)
    from edgefleet_dev.devcluster import node
    from edgefleet_dev.images.spec import VERSION

    digests = sync(f"{edgefleet_api.registry}/edgefleet", echo=lambda _: None)
    # tags the node pulled earlier (profiles name ghcr.io/edgefleet/<name>:VERSION) must name these builds
    node.refresh_images(edgefleet_api.state, [f"ghcr.io/edgefleet/{name}:{VERSION}" for name in digests])
    return digests


@pytest.fixture(autouse=True)
def fresh_pod_reads(request, monkeypatch):
    """Unit tests reconcile one namespace and name over and over, changing pods in between as if time had passed:
    there every reconcile reads the pods afresh (the throttle itself: tests/unit/test_reconcile_pod_reads.py).
    Not a conftest of tests/unit: runtime tests import `conftest` by name and must get this one."""
    if "unit" in request.node.path.parts:
        from edgefleet.reconcile import deployment

        monkeypatch.setattr(deployment, "POD_READS", deployment.PodReads(seconds=0))
