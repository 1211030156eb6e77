"""The Helm chart: lint, render with default and non-default values, schema rejections, least-privilege
RBAC, and the CRD templates staying in sync with crds/. The chart templates no HardwareProfiles: the
operator applies the built-in ones at start-up while profiles.builtin.enabled (EDGEFLEET_BUILTIN_PROFILES)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from edgefleet_dev import toolchain as components

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "edgefleet"
KUBE_VERSION = components.KUBE_VERSION  # helm built from source defaults to v1.20; the chart needs >=1.28


@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> callable:
    binary = components.binary_path("helm")
    if not binary.exists():
        pytest.skip(f"helm is not built yet ({binary} missing): run `edgefleet cluster build`")
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    env.pop("KUBECONFIG", None)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    return run


def template(helm, *args: str, namespace: str = "edgefleet-system", check: bool = True):
    return helm("template", "ef", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION,
                *args, check=check)


def render(helm, *args: str, namespace: str = "edgefleet-system") -> list[dict]:
    return [d for d in yaml.safe_load_all(template(helm, *args, namespace=namespace).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def operator_container(docs: list[dict]) -> dict:
    (dep,) = by_kind(docs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


# ---------------------------------------------------------------- lint and defaults


def test_lint(helm):
    out = helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION)
    assert "0 chart(s) failed" in out.stdout


def test_lint_with_non_default_values(helm):
    helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION,
         "--set", "compile.executor=job", "--set", "serviceMonitor.enabled=true",
         "--set", "artifactStore.url=oci://registry.example/edgefleet", "--set", "artifactStore.credentialsSecret=reg")


def test_defaults_render_everything(helm):
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("CustomResourceDefinition") == 4  # HardwareProfile, EdgeModel, EdgeDeployment, FederatedTraining
    assert "HardwareProfile" not in kinds  # the operator applies them (a first install cannot: no such kind yet)
    for kind in ("Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                 "Service"):
        assert kind in kinds, kind
    assert "ServiceMonitor" not in kinds
    for crd in by_kind(docs, "CustomResourceDefinition"):
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_operator_deployment_defaults(helm):
    docs = render(helm)
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = operator_container(docs)
    assert dep["spec"]["replicas"] == 1
    assert dep["metadata"]["namespace"] == "edgefleet-system"
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert c["image"] == f"ghcr.io/edgefleet/operator:{app_version}"
    assert c["command"] == ["edgefleet"]
    assert c["args"] == ["operator", "--liveness=http://0.0.0.0:8080/healthz"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"healthz": 8080, "metrics": 9090}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == "ef-edgefleet"
    env = env_of(c)
    assert env["EDGEFLEET_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["EDGEFLEET_COMPILE_EXECUTOR"]["value"] == "inline"
    assert env["EDGEFLEET_WATCH_NAMESPACES"]["value"] == ""
    assert env["EDGEFLEET_ARTIFACT_STORE"]["value"] == ""
    assert env["EDGEFLEET_ARTIFACT_INSECURE"]["value"] == "false"
    assert env["EDGEFLEET_NODE_CACHE"]["value"] == "/var/lib/edgefleet/cache"
    # the node cache's CSI driver is opt-in: off, runtime pods keep the hostPath cache
    assert env["EDGEFLEET_NODE_CACHE_DRIVER"]["value"] == "false"
    assert not by_kind(docs, "CSIDriver") and not by_kind(docs, "DaemonSet")
    assert env["EDGEFLEET_LOG_LEVEL"]["value"] == "INFO"
    assert env["EDGEFLEET_BUILTIN_PROFILES"]["value"] == "true"
    assert env["EDGEFLEET_COMPILER_IMAGE"]["value"] == f"ghcr.io/edgefleet/compiler:{app_version}"
    assert env["EDGEFLEET_IMAGE_REGISTRY"]["value"] == "ghcr.io/edgefleet"
    assert json.loads(env["EDGEFLEET_IMAGE_DIGESTS"]["value"]) == {}
    assert json.loads(env["EDGEFLEET_COMPILE_RESOURCES"]["value"])["requests"]["memory"] == "2Gi"
    assert "EDGEFLEET_ARTIFACT_USERNAME" not in env
    # a read-only root filesystem needs writable scratch space
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/var/lib/edgefleet"}


def test_non_default_values(helm):
    docs = render(
        helm,
        "--set", "replicaCount=0",
        "--set", "image.tag=9.9.9",
        "--set", "watchNamespaces={edge-a,edge-b}",
        "--set", "artifactStore.url=oci://registry.example:5000/edgefleet/variants",
        "--set", "artifactStore.insecure=true",
        "--set", "artifactStore.credentialsSecret=registry-creds",
        "--set", "compile.executor=job",
        "--set", "compile.image.repository=ghcr.io/edgefleet/compiler",
        "--set", "nodeCache.hostPath=/data/edgefleet",
        "--set", "logLevel=DEBUG",
        "--set", "serviceMonitor.enabled=true",
        "--set", "serviceMonitor.labels.release=prom",
        "--set", "crds.enabled=false",
        "--set", "profiles.builtin.enabled=false",
        "--set", "nodeSelector.role=infra",
        "--set", "tolerations[0].key=dedicated",
        "--set", "tolerations[0].operator=Exists",
        namespace="ops",
    )
    kinds = [d["kind"] for d in docs]
    assert "CustomResourceDefinition" not in kinds and "HardwareProfile" not in kinds
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 0
    c = operator_container(docs)
    assert c["image"] == "ghcr.io/edgefleet/operator:9.9.9"
    env = env_of(c)
    assert env["EDGEFLEET_WATCH_NAMESPACES"]["value"] == "edge-a,edge-b"
    assert env["EDGEFLEET_ARTIFACT_STORE"]["value"] == "oci://registry.example:5000/edgefleet/variants"
    assert env["EDGEFLEET_ARTIFACT_INSECURE"]["value"] == "true"
    assert env["EDGEFLEET_ARTIFACT_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "registry-creds",
                                                                               "key": "username"}
    assert env["EDGEFLEET_ARTIFACT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "registry-creds",
                                                                               "key": "password"}
    assert env["EDGEFLEET_COMPILE_EXECUTOR"]["value"] == "job"
    assert env["EDGEFLEET_COMPILER_IMAGE"]["value"] == "ghcr.io/edgefleet/compiler:0.1.0"
    assert env["EDGEFLEET_NODE_CACHE"]["value"] == "/data/edgefleet"
    assert env["EDGEFLEET_LOG_LEVEL"]["value"] == "DEBUG"
    assert env["EDGEFLEET_BUILTIN_PROFILES"]["value"] == "false"
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "role": "infra"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["metadata"]["namespace"] == "ops"
    (svc,) = by_kind(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


def _driver(docs: list[dict]) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """The node cache driver's container, its volumes and its mounts, by name."""
    (cache,) = by_kind(docs, "DaemonSet")
    pod = cache["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return c, {v["name"]: v for v in pod["volumes"]}, {m["name"]: m for m in c["volumeMounts"]}


def test_node_cache_driver_when_enabled(helm):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    docs = render(helm, "--set", "nodeCache.enabled=true")
    assert env_of(operator_container(docs))["EDGEFLEET_NODE_CACHE_DRIVER"]["value"] == "true"
    (driver,) = by_kind(docs, "CSIDriver")
    assert driver["metadata"]["name"] == "cache.edgefleet.io" and driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["volumeLifecycleModes"] == ["Ephemeral"]
    (cache,) = by_kind(docs, "DaemonSet")
    assert cache["metadata"]["namespace"] == "edgefleet-system"
    c, volumes, mounts = _driver(docs)
    assert c["image"] == f"ghcr.io/edgefleet/runtime-cpu:{app_version}"
    assert volumes["cache"]["hostPath"]["path"] == "/var/lib/edgefleet/cache"
    assert volumes["pods"]["hostPath"]["path"] == mounts["pods"]["mountPath"] == "/var/lib/kubelet/pods"
    assert "--csi-socket=/var/lib/kubelet/plugins/cache.edgefleet.io/csi.sock" in c["args"]


def test_node_cache_driver_follows_the_kubelet_dir_and_host_path(helm):
    """A kubelet with another --root-dir (k0s, microk8s, the dev cluster's real node): every kubelet path of the
    driver moves with nodeCache.kubeletDir, on the host and in the container alike (the socket path the driver
    registers is the one the kubelet dials)."""
    kubelet = "/data/k/kubelet"
    docs = render(helm, "--set", "nodeCache.enabled=true", "--set", f"nodeCache.kubeletDir={kubelet}",
                  "--set", "nodeCache.hostPath=/data/edgefleet", namespace="ops")
    (cache,) = by_kind(docs, "DaemonSet")
    assert cache["metadata"]["namespace"] == "ops"
    c, volumes, mounts = _driver(docs)
    assert "--root=/data/edgefleet" in c["args"]
    assert f"--csi-socket={kubelet}/plugins/cache.edgefleet.io/csi.sock" in c["args"]
    assert f"--registration-socket={kubelet}/plugins_registry/cache.edgefleet.io-reg.sock" in c["args"]
    for name, path in [("plugin", "plugins/cache.edgefleet.io"), ("registration", "plugins_registry"),
                       ("pods", "pods")]:
        assert volumes[name]["hostPath"]["path"] == mounts[name]["mountPath"] == f"{kubelet}/{path}"
    assert mounts["pods"]["mountPropagation"] == "Bidirectional"
    assert "/var/lib/kubelet" not in json.dumps(cache)


def test_rbac_and_service_account_can_be_turned_off(helm):
    docs = render(helm, "--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                  "--set", "serviceAccount.name=my-operator")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "my-operator"


def test_crds_keep_can_be_turned_off(helm):
    for crd in by_kind(render(helm, "--set", "crds.keep=false"), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


@pytest.mark.parametrize(("flag", "expected"), [(None, "true"), ("true", "true"), ("false", "false")])
def test_builtin_profiles_are_applied_by_the_operator(helm, flag, expected):
    # Helm builds every object of a release before creating any, so a HardwareProfile cannot be in the
    # same first install as its CRD: the operator applies the built-in ones itself when told to.
    args = ("--set", f"profiles.builtin.enabled={flag}") if flag else ()
    docs = render(helm, *args)
    assert not by_kind(docs, "HardwareProfile")
    env = env_of(operator_container(docs))
    assert env["EDGEFLEET_BUILTIN_PROFILES"] == {"name": "EDGEFLEET_BUILTIN_PROFILES", "value": expected}
    assert not (CHART / "templates" / "profiles").exists()


# ---------------------------------------------------------------- values.schema.json


@pytest.mark.parametrize(
    ("flag", "named", "says"),
    [
        ("compile.executor=docker", "compile/executor", "inline"),
        ("replicaCount=-1", "replicaCount", "minimum"),
        ("replicaCount=2", "replicaCount", "maximum"),
        ("artifactStore.url=http://registry.example/x", "artifactStore/url", "pattern"),
        ("logLevel=verbose", "logLevel", "DEBUG"),
        ("watchNamespaces={Bad_NS}", "watchNamespaces", "pattern"),
        ("nodeCache.hostPath=relative/path", "nodeCache/hostPath", "pattern"),
        ("nodeCache.kubeletDir=var/lib/kubelet", "nodeCache/kubeletDir", "pattern"),
        ("nodeCache.kubeletDir=/var/lib/kubelet/", "nodeCache/kubeletDir", "pattern"),
        ("no.such.key=1", "additional properties 'no' not allowed", ""),
    ],
)
def test_schema_rejects_bad_values(helm, flag, named, says):
    proc = template(helm, "--set", flag, check=False)
    assert proc.returncode != 0, f"--set {flag} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert named in proc.stderr and says in proc.stderr, proc.stderr


def test_schema_rejects_non_integer_replicas(helm, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("replicaCount: 1.5\n")
    proc = template(helm, "-f", str(values), check=False)
    assert proc.returncode != 0
    assert "replicaCount" in proc.stderr and "integer" in proc.stderr, proc.stderr


def test_service_monitor_needs_the_metrics_service(helm):
    proc = template(helm, "--set", "serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false",
                    check=False)
    assert proc.returncode != 0
    assert "serviceMonitor.enabled needs metrics.service.enabled" in proc.stderr


# ---------------------------------------------------------------- RBAC


EXPECTED_CLUSTER_RULES = {
    ("edgefleet.io", "hardwareprofiles"): {"get", "list", "watch", "create", "patch", "update"},  # built-ins
    ("edgefleet.io", "edgemodels"): {"get", "list", "watch", "patch", "update"},
    ("edgefleet.io", "edgedeployments"): {"get", "list", "watch", "patch", "update"},
    ("edgefleet.io", "federatedtrainings"): {"get", "list", "watch", "patch", "update"},
    ("edgefleet.io", "hardwareprofiles/status"): {"get", "patch", "update"},
    ("edgefleet.io", "edgemodels/status"): {"get", "patch", "update"},
    ("edgefleet.io", "edgedeployments/status"): {"get", "patch", "update"},
    ("edgefleet.io", "federatedtrainings/status"): {"get", "patch", "update"},
    ("edgefleet.io", "hardwareprofiles/finalizers"): {"update"},
    ("edgefleet.io", "edgemodels/finalizers"): {"update"},
    ("edgefleet.io", "edgedeployments/finalizers"): {"update"},
    ("edgefleet.io", "federatedtrainings/finalizers"): {"update"},
    ("", "secrets"): {"create"},  # a FederatedTraining run's Secret; never read back (AlreadyExists = made)
    ("apps", "daemonsets"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "configmaps"): {"get", "list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"list", "delete", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"get", "list", "watch"},
}
EXPECTED_ROLE_RULES = {
    ("", "secrets"): {"get", "list", "watch"},
    ("", "configmaps"): {"create", "patch", "delete"},
    ("", "serviceaccounts"): {"create"},  # the Jobs' own identity for the store (model_jobs._ensure_job_account)
}


def _grants(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_has_no_wildcards(helm):
    docs = render(helm)
    roles = by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
    assert len(roles) == 2
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                for item in rule.get(key, []):
                    assert "*" not in item, f"{role['kind']} {role['metadata']['name']}: wildcard in {key}: {rule}"


def test_rbac_is_exactly_what_the_operator_uses(helm):
    docs = render(helm, namespace="ops")
    (cluster_role,) = by_kind(docs, "ClusterRole")
    (role,) = by_kind(docs, "Role")
    assert _grants(cluster_role) == EXPECTED_CLUSTER_RULES
    assert _grants(role) == EXPECTED_ROLE_RULES
    assert role["metadata"]["namespace"] == "ops"
    # Secrets: cluster-wide only create (a run's own Secret); reading them only in the release namespace
    assert _grants(cluster_role)[("", "secrets")] == {"create"}
    (sa,) = by_kind(docs, "ServiceAccount")
    for binding in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ops"}]
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    (rb,) = by_kind(docs, "RoleBinding")
    assert crb["roleRef"]["name"] == cluster_role["metadata"]["name"] and crb["roleRef"]["kind"] == "ClusterRole"
    assert rb["roleRef"]["name"] == role["metadata"]["name"] and rb["roleRef"]["kind"] == "Role"
    assert rb["metadata"]["namespace"] == "ops"


# ---------------------------------------------------------------- drift from crds/


def _generator():
    spec = importlib.util.spec_from_file_location("chart_generate", REPO / "charts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_crds_match_their_sources(tmp_path):
    """Fails when crds/ changed and `python charts/generate.py` was not run."""
    proc = subprocess.run(["python", str(REPO / "charts" / "generate.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crds"]  # nothing but the CRDs is generated
    templates = CHART / "templates" / "crds"
    generated = sorted(p.name for p in (tmp_path / "crds").glob("*.yaml"))
    in_chart = sorted(p.name for p in templates.glob("*.yaml"))
    assert generated == in_chart, "templates/crds: run `python charts/generate.py`"
    for name in generated:
        assert (templates / name).read_text() == (tmp_path / "crds" / name).read_text(), (
            f"charts/edgefleet/templates/crds/{name} drifted from its source: run `python charts/generate.py`"
        )


def test_chart_crds_render_to_exactly_the_generated_crds(helm):
    """Rendered through Helm, each CRD equals crds/<file> apart from the release metadata."""
    rendered = {d["metadata"]["name"]: d for d in by_kind(render(helm), "CustomResourceDefinition")}
    sources = {p.name.removesuffix(".yaml"): yaml.safe_load(p.read_text()) for p in (REPO / "crds").glob("*.yaml")}
    assert rendered.keys() == sources.keys()
    for name, source in sources.items():
        got = rendered[name]
        assert got["spec"] == source["spec"], name
        assert source["metadata"]["labels"].items() <= got["metadata"]["labels"].items()


def test_drift_check_notices_a_change(tmp_path):
    gen = _generator()
    crds = tmp_path / "crds"
    crds.mkdir()
    for p in (REPO / "crds").glob("*.yaml"):
        (crds / p.name).write_text(p.read_text())
    first = next(iter(sorted(crds.glob("*.yaml"))))
    doc = yaml.safe_load(first.read_text())
    doc["spec"]["names"]["shortNames"].append("drifted")
    first.write_text(yaml.safe_dump(doc))
    problems = gen.drift(gen.render(crds=crds))
    assert any(first.name in p for p in problems), problems
    assert gen.drift(gen.render()) == []


def test_drift_check_notices_a_leftover_generated_template(tmp_path):
    """A generated template the generator no longer writes (e.g. the old templates/profiles/) is drift."""
    gen = _generator()
    files = gen.render()
    gen.write(files, tmp_path)
    assert gen.drift(files, tmp_path) == []
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "cpu-amd64.yaml").write_text(gen.HEADER.format(source="x") + "kind: HardwareProfile\n")
    (tmp_path / "deployment.yaml").write_text("kind: Deployment\n")  # hand-written templates are not drift
    (problems,) = gen.drift(files, tmp_path)
    assert problems.startswith("profiles/cpu-amd64.yaml: generated once"), problems
    assert subprocess.run(["python", str(REPO / "charts" / "generate.py"), "--check", "--out", str(tmp_path)],
                          capture_output=True, timeout=60).returncode == 1


def test_templates_escape_go_template_braces():
    gen = _generator()
    text = gen.crd_template(
        {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
         "metadata": {"name": "x.edgefleet.io"}, "spec": {"description": "use {{ .Values }}"}},
        "test",
    )
    assert '{{ "{{" }} .Values }}' in text


def test_one_registry_prefix_and_digests_for_every_image(helm):
    digest = "sha256:" + "ab" * 32
    docs = render(helm, "--set", "images.registry=reg.local:5000/ef", "--set", f"images.digests.operator={digest}",
                  "--set", f"images.digests.runtime-cpu={digest}")
    c = operator_container(docs)
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert c["image"] == f"reg.local:5000/ef/operator@{digest}"
    env = env_of(c)
    assert env["EDGEFLEET_COMPILER_IMAGE"]["value"] == f"reg.local:5000/ef/compiler:{app_version}"
    assert env["EDGEFLEET_IMAGE_REGISTRY"]["value"] == "reg.local:5000/ef"
    assert json.loads(env["EDGEFLEET_IMAGE_DIGESTS"]["value"]) == {"operator": digest, "runtime-cpu": digest}


def test_image_digest_must_be_a_sha256(helm):
    proc = template(helm, "--set", "images.digests.operator=latest", check=False)
    assert proc.returncode != 0 and re.search(r"images[./]digests", proc.stderr), proc.stderr


def test_require_digests_refuses_to_render_any_image_by_tag_and_names_the_missing_ones(helm):
    from edgefleet.api import builtin_profiles

    runtime_images = sorted({p.spec.runtime_image.rsplit("/", 1)[1].split(":")[0] for p in builtin_profiles()})
    digest = "sha256:" + "cd" * 32
    proc = template(helm, "--set", "images.requireDigests=true", "--set", f"images.digests.operator={digest}",
                    check=False)
    assert proc.returncode != 0
    assert re.search(r"images\.digests lacks compiler, " + ", ".join(runtime_images) + ";", proc.stderr), proc.stderr
    assert "edgefleet images build --all --push" in proc.stderr

    every = [a for n in ["operator", "compiler", *runtime_images] for a in ("--set", f"images.digests.{n}={digest}")]
    docs = render(helm, "--set", "images.requireDigests=true", *every)
    assert operator_container(docs)["image"].endswith(f"/operator@{digest}")
    without_builtins = template(helm, "--set", "images.requireDigests=true", "--set", "profiles.builtin.enabled=false",
                                "--set", f"images.digests.operator={digest}", "--set", f"compile.image.digest={digest}")
    assert without_builtins.returncode == 0


# ---------------------------------------------------------------- signed variants (docs/trust.md)


def test_signing_key_secret_reaches_inline_compiles_and_compile_jobs(helm):
    container = operator_container(render(helm))
    assert "EDGEFLEET_SIGNING_KEY_FILE" not in env_of(container)  # off by default
    docs = render(helm, "--set", "signing.keySecret=edgefleet-signing")
    container = operator_container(docs)
    env = env_of(container)
    assert env["EDGEFLEET_SIGNING_KEY_SECRET"]["value"] == "edgefleet-signing"
    key_file = env["EDGEFLEET_SIGNING_KEY_FILE"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "signing-key")
    assert key_file == mount["mountPath"] + "/key" and mount["readOnly"] is True
    (dep,) = by_kind(docs, "Deployment")
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "signing-key")
    assert volume["secret"] == {"secretName": "edgefleet-signing", "items": [{"key": "key", "path": "key"}],
                                "defaultMode": 0o440}
    from edgefleet.settings import Settings

    settings = Settings(**{k.removeprefix("EDGEFLEET_").lower(): v["value"] for k, v in env.items()
                           if k in ("EDGEFLEET_SIGNING_KEY_FILE", "EDGEFLEET_SIGNING_KEY_SECRET")})
    assert str(settings.signing_key_file) == key_file and settings.signing_key_secret == "edgefleet-signing"
    proc = template(helm, "--set", "signing.keySecret=Bad_Name", check=False)
    assert proc.returncode != 0 and "signing/keySecret" in proc.stderr, proc.stderr


def test_compile_job_placement_reaches_the_operator(helm, monkeypatch):
    env = env_of(operator_container(render(helm)))
    assert json.loads(env["EDGEFLEET_COMPILE_NODE_SELECTOR"]["value"]) == {}
    assert json.loads(env["EDGEFLEET_COMPILE_TOLERATIONS"]["value"]) == []
    toleration = {"key": "edgefleet.io/real-node", "operator": "Exists", "effect": "NoSchedule"}
    values = {"compile": {"nodeSelector": {"edgefleet.io/real-node": "true"}, "tolerations": [toleration]}}
    env = env_of(operator_container(render(helm, "--set-json", f"compile={json.dumps(values['compile'])}")))
    from edgefleet.settings import Settings

    for name in ("EDGEFLEET_COMPILE_NODE_SELECTOR", "EDGEFLEET_COMPILE_TOLERATIONS"):
        monkeypatch.setenv(name, env[name]["value"])
    settings = Settings()
    assert settings.compile_node_selector == {"edgefleet.io/real-node": "true"}
    assert settings.compile_tolerations == [toleration]
    proc = template(helm, "--set", "compile.tolerations=oops", check=False)
    assert proc.returncode != 0 and "compile/tolerations" in proc.stderr, proc.stderr


def test_operator_runs_as_the_images_user(helm):
    from edgefleet_dev.images.spec import UID

    (dep,) = by_kind(render(helm), "Deployment")
    pod = dep["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (UID, UID, UID)
