"""The chart's RBAC against the real API server: `helm install`, then `kubectl auth can-i --as` the
operator's ServiceAccount proves what it can and cannot do, then `helm uninstall` leaves nothing behind.

The release skips the CRDs (crds.enabled=false): other tests apply crds/ with `kubectl apply
--server-side`, and Helm refuses to adopt objects another owner created. The chart never templates
HardwareProfiles (the operator applies the built-in ones; profiles.builtin.enabled=false keeps this
release's operator from touching the shared cluster's). RBAC rules do not need the CRDs to exist. The
release name is unique per test, so the ClusterRole/ClusterRoleBinding names never collide with another
release.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "edgefleet"


@pytest.fixture
def release(cluster, namespace):
    """Install the chart into `namespace` as a unique release; uninstall (and check it) afterwards."""
    name = f"rbac-{namespace.removeprefix('t-')}"
    out = cluster.helm("install", name, str(CHART), "--namespace", namespace,
                       "--set", "crds.enabled=false", "--set", "profiles.builtin.enabled=false",
                       "--set", "artifactStore.credentialsSecret=registry-creds")
    assert "STATUS: deployed" in out.stdout, out.stdout
    info = {"name": name, "namespace": namespace, "fullname": f"{name}-edgefleet",
            "sa": f"system:serviceaccount:{namespace}:{name}-edgefleet", "uninstalled": False}
    yield info
    if not info["uninstalled"]:
        cluster.helm("uninstall", name, "--namespace", namespace, "--wait", check=False)


def can_i(cluster, who: str, verb: str, resource: str, *, namespace: str | None = None,
          subresource: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={who}"]
    args += ["--namespace", namespace] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    proc = cluster.kubectl(*args, check=False)
    answer = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


def test_operator_service_account_is_least_privilege(cluster, release):
    sa, ns = release["sa"], release["namespace"]
    elsewhere = "default"

    # what the operator needs
    assert can_i(cluster, sa, "list", "nodes")
    assert can_i(cluster, sa, "watch", "nodes")
    assert can_i(cluster, sa, "patch", "edgemodels.edgefleet.io", namespace=elsewhere, subresource="status")
    assert can_i(cluster, sa, "update", "edgedeployments.edgefleet.io", namespace=elsewhere, subresource="status")
    assert can_i(cluster, sa, "list", "hardwareprofiles.edgefleet.io")
    # server-side apply of the built-in profiles: create when absent, patch when present
    assert can_i(cluster, sa, "create", "hardwareprofiles.edgefleet.io")
    assert can_i(cluster, sa, "patch", "hardwareprofiles.edgefleet.io")
    assert can_i(cluster, sa, "create", "daemonsets.apps", namespace=elsewhere)
    assert can_i(cluster, sa, "delete", "deployments.apps", namespace=elsewhere)
    assert can_i(cluster, sa, "create", "services", namespace=elsewhere)
    assert can_i(cluster, sa, "create", "jobs.batch", namespace=elsewhere)
    assert can_i(cluster, sa, "patch", "federatedtrainings.edgefleet.io", namespace=elsewhere, subresource="status")
    assert can_i(cluster, sa, "watch", "federatedtrainings.edgefleet.io")
    assert can_i(cluster, sa, "create", "secrets", namespace=elsewhere)  # a FederatedTraining run's TLS Secret
    assert can_i(cluster, sa, "create", "events", namespace=elsewhere)
    assert can_i(cluster, sa, "list", "customresourcedefinitions.apiextensions.k8s.io")
    assert can_i(cluster, sa, "get", "secrets", namespace=ns)
    assert not can_i(cluster, sa, "update", "leases.coordination.k8s.io", namespace=ns)  # no leader election

    # what it must not do
    # Secrets elsewhere: create only (a run's own), never read, listed, watched or changed
    for verb in ("get", "list", "watch", "update", "patch", "delete", "deletecollection"):
        assert not can_i(cluster, sa, verb, "secrets", namespace=elsewhere), verb
        assert not can_i(cluster, sa, verb, "secrets"), f"{verb} cluster-wide"
    assert not can_i(cluster, sa, "update", "leases.coordination.k8s.io", namespace=elsewhere)
    assert not can_i(cluster, sa, "create", "configmaps", namespace=elsewhere)  # only its own compile inputs
    assert not can_i(cluster, sa, "delete", "nodes")
    assert not can_i(cluster, sa, "patch", "nodes")
    assert not can_i(cluster, sa, "create", "pods", namespace=elsewhere)
    assert not can_i(cluster, sa, "create", "pods", namespace=ns)
    assert not can_i(cluster, sa, "create", "pods", namespace=ns, subresource="exec")
    assert not can_i(cluster, sa, "create", "edgemodels.edgefleet.io", namespace=elsewhere)
    assert not can_i(cluster, sa, "delete", "hardwareprofiles.edgefleet.io")
    assert not can_i(cluster, sa, "update", "configmaps", namespace=elsewhere)
    assert not can_i(cluster, sa, "delete", "customresourcedefinitions.apiextensions.k8s.io")
    for verb in ("get", "create", "patch", "delete", "bind", "escalate"):
        assert not can_i(cluster, sa, verb, "clusterroles.rbac.authorization.k8s.io"), verb
        assert not can_i(cluster, sa, verb, "clusterrolebindings.rbac.authorization.k8s.io"), verb
        assert not can_i(cluster, sa, verb, "roles.rbac.authorization.k8s.io", namespace=ns), verb
    assert not can_i(cluster, sa, "impersonate", "serviceaccounts")
    assert not can_i(cluster, sa, "create", "serviceaccounts", namespace=ns, subresource="token")


def test_install_creates_the_operator_and_uninstall_removes_everything(cluster, release):
    name, ns, full = release["name"], release["namespace"], release["fullname"]
    dep = cluster.kubectl("get", "deployment", full, "-n", ns,
                          "-o", "jsonpath={.spec.template.spec.serviceAccountName}")
    assert dep.stdout == full
    for kind in ("clusterrole", "clusterrolebinding"):
        cluster.kubectl("get", kind, full)
    for kind in ("role", "rolebinding", "serviceaccount", "service"):
        cluster.kubectl("get", kind, full if kind != "service" else f"{full}-metrics", "-n", ns)
    # the release skipped the CRDs and the chart has no profiles: it owns none of them
    manifest = cluster.helm("get", "manifest", name, "--namespace", ns).stdout
    assert "kind: CustomResourceDefinition" not in manifest and "kind: HardwareProfile" not in manifest

    cluster.helm("uninstall", name, "--namespace", ns, "--wait")
    release["uninstalled"] = True
    assert name not in cluster.helm("list", "--namespace", ns, "--short").stdout.split()
    selector = f"app.kubernetes.io/instance={name}"
    for kind in ("clusterrole", "clusterrolebinding"):
        left = cluster.kubectl("get", kind, "-l", selector, "-o", "name").stdout.strip()
        assert not left, f"left behind after helm uninstall: {left}"
    left = cluster.kubectl("get", "deployment,service,serviceaccount,role,rolebinding,secret,configmap",
                           "-n", ns, "-l", selector, "-o", "name").stdout.strip()
    assert not left, f"left behind after helm uninstall: {left}"
    assert not can_i(cluster, release["sa"], "list", "nodes")
