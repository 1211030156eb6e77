"""The dev cluster's real node runs real pods: it registers Ready with this machine's labels beside the kwok
fleet, pulls from the dev registry, gives pods IPs on its bridge, routes ClusterIP Services, and serves
kubectl logs and exec. Skipped, with the reason, where the host cannot run a real node."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import platform
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from edgefleet_dev.devcluster import node
from edgefleet_dev.devcluster.cluster import real_node_skip_reason
from kube_helpers import apply, get, is_ready, wait_for

pytestmark = pytest.mark.cluster

ECHO_SOURCE = Path(__file__).resolve().parents[1] / "fixtures" / "echo-server"
PROFILES = Path(__file__).resolve().parents[2] / "operator" / "edgefleet" / "profiles"
TOLERATION = {"key": node.TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def real(cluster) -> dict:
    """The session cluster's real node (skips with the reason when it has none)."""
    if cluster.real_node is None:
        reason = real_node_skip_reason(cluster.state.name) or (
            f"cluster {cluster.state.name!r} was started without a real node; "
            f"add one with `edgefleet cluster up --name {cluster.state.name} --real-node`")
        pytest.skip(f"no real node: {reason}")
    return cluster.real_node


def build_echo_image(cluster, tmp: Path) -> str:
    """Build the echo server, pack it as a one-layer image and push it to the dev registry; returns its ref."""
    go = shutil.which("go")
    assert go, "the Go toolchain builds the test image"
    binary = tmp / "echo-server"
    subprocess.run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(binary), "."], cwd=ECHO_SOURCE,
                   check=True, env={**os.environ, "CGO_ENABLED": "0"})
    tag = hashlib.sha256(binary.read_bytes()).hexdigest()[:12]
    layout = tmp / "echo.tar"
    node.write_oci_archive(layout, f"echo:{tag}", {"echo-server": binary.read_bytes()}, ["/echo-server"])
    ref = f"{cluster.registry}/edgefleet-test/echo:{tag}"
    push_oci_archive(layout, ref)
    return ref


def push_oci_archive(archive: Path, ref: str) -> None:
    """Push a one-manifest OCI layout tar to a plain-HTTP registry on loopback (the distribution API; the dev
    registry's token challenge answered as the tooling answers it)."""
    import requests
    from edgefleet_dev.net import RegistryTokenAuth

    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    base = f"http://{host}/v2/{repo}"
    session = requests.Session()
    session.auth = RegistryTokenAuth()
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        desc = index["manifests"][0]
        manifest = tar.extractfile(f"blobs/sha256/{desc['digest'].split(':')[1]}").read()
        for blob in [json.loads(manifest)["config"], *json.loads(manifest)["layers"]]:
            data = tar.extractfile(f"blobs/sha256/{blob['digest'].split(':')[1]}").read()
            start = session.post(f"{base}/blobs/uploads/", timeout=30)
            start.raise_for_status()
            location = start.headers["Location"]
            sep = "&" if "?" in location else "?"
            url = location if location.startswith("http") else f"http://{host}{location}"
            session.put(f"{url}{sep}digest={blob['digest']}", data=data, timeout=60,
                        headers={"Content-Type": "application/octet-stream"}).raise_for_status()
    session.put(f"{base}/manifests/{tag}", data=manifest, timeout=30,
                headers={"Content-Type": desc["mediaType"]}).raise_for_status()


@pytest.fixture(scope="module")
def echo_image(cluster, real, tmp_path_factory) -> str:
    return build_echo_image(cluster, tmp_path_factory.mktemp("echo"))


def echo_pod(name: str, image: str, node_name: str, labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node_name},
            "tolerations": [TOLERATION],
            "terminationGracePeriodSeconds": 2,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "echo", "image": image, "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


@pytest.fixture(scope="module")
def served(cluster, real, echo_image, tmp_path_factory):
    """One echo pod on the real node and a ClusterIP Service in front of it, in a namespace of their own."""
    ns = f"real-{hashlib.sha256(str(tmp_path_factory.getbasetemp()).encode()).hexdigest()[:8]}"
    cluster.kubectl("create", "namespace", ns)
    wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
             what="the namespace's default ServiceAccount")
    apply(cluster, ns, [
        echo_pod("echo", echo_image, real["name"]),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
         "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ])
    pod = wait_for(lambda: (p := get(cluster, ns, "pod", "echo")) and is_ready(p) and p, timeout=120,
                   what="the echo pod Ready on the real node")
    yield ns, pod
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def test_real_node_is_ready_with_this_machines_labels(cluster, real):
    obj = get(cluster, None, "node", real["name"])
    labels, info = obj["metadata"]["labels"], obj["status"]["nodeInfo"]
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready
    assert info["containerRuntimeVersion"].startswith("containerd://2.")
    assert info["kubeletVersion"] == "v1.36.3"
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    assert labels["kubernetes.io/arch"] == arch
    flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    vnni = labels.get("feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI")
    assert vnni == ("true" if "avx512_vnni" in flags else None)
    assert "kwok.x-k8s.io/node" not in obj["metadata"].get("annotations", {})  # kwok leaves it alone
    addresses = {a["type"]: a["address"] for a in obj["status"]["addresses"]}
    assert addresses["InternalIP"] == node.NODE_IP and not ipaddress.ip_address(node.NODE_IP).is_loopback
    assert {"key": node.TAINT["key"], "value": "true", "effect": "NoSchedule"} in obj["spec"]["taints"]


def test_real_node_joins_a_hardware_class(cluster, real):
    labels = get(cluster, None, "node", real["name"])["metadata"]["labels"]
    matched = []
    for path in PROFILES.glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())["spec"]
        wanted = spec["nodeSelector"].get("matchLabels", {})
        exprs = spec["nodeSelector"].get("matchExpressions", [])
        if all(labels.get(k) == v for k, v in wanted.items()) and all(
                labels.get(e["key"]) in e["values"] for e in exprs if e["operator"] == "In"):
            matched.append(path.stem)
    assert "cpu-amd64" in matched or "cpu-arm64" in matched
    if labels.get("feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI") == "true":
        assert "intel-openvino" in matched


def test_kwok_still_runs_the_fleet(cluster, real):
    nodes = get(cluster, None, "nodes")["items"]
    fleet = [n for n in nodes if n["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") == "fake"]
    assert fleet and all(
        next(c for c in n["status"]["conditions"] if c["type"] == "Ready")["status"] == "True" for n in fleet)
    assert all(n["status"]["nodeInfo"]["kubeletVersion"].startswith("kwok-") for n in fleet)


def test_pod_runs_with_an_ip_on_the_bridge_and_serves(served):
    _, pod = served
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(node.POD_SUBNET) and ip != node.NODE_IP
    assert pod["status"]["hostIP"] == node.NODE_IP
    assert http_get(f"http://{ip}:8080/") == "hello from echo\n"


def test_cluster_ip_service_routes_to_the_pod(cluster, served):
    ns, pod = served
    svc = get(cluster, ns, "service", "echo")
    ip = svc["spec"]["clusterIP"]
    wait_for(lambda: _safe_get(f"http://{ip}/") == "hello from echo\n", timeout=30,
             what=f"the ClusterIP {ip} to route to the pod from the host")
    out = cluster.kubectl("exec", "-n", ns, "echo", "--", "/echo-server", "get", f"http://{ip}/").stdout
    assert out == "200 hello from echo\n"  # from a pod through the Service (hairpin back to itself)


def _safe_get(url: str) -> str | None:
    try:
        return http_get(url, timeout=2)
    except OSError:
        return None


def test_kubectl_logs_and_exec(cluster, served):
    ns, pod = served
    http_get(f"http://{pod['status']['podIP']}:8080/logs-marker")
    wait_for(lambda: "served /logs-marker" in cluster.kubectl("logs", "-n", ns, "echo").stdout,
             timeout=20, what="the request in kubectl logs")
    assert "echo-server listening on :8080" in cluster.kubectl("logs", "-n", ns, "echo").stdout
    assert cluster.kubectl("exec", "-n", ns, "echo", "--", "/echo-server", "say", "hi", "there").stdout == \
        "hi there\n"


def test_pods_reach_the_registry_and_the_api_server(cluster, served):
    ns, _ = served
    registry = cluster.kubectl("exec", "-n", ns, "echo", "--", "/echo-server", "get",
                               f"http://{cluster.pod_registry}/v2/").stdout
    assert registry.startswith("401 ")  # the registry's token challenge: it answers, and asks who is calling
    # the host reaches it at the same address, so one artifact store URL serves a host-run operator and its pods
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(f"http://{cluster.pod_registry}/v2/", timeout=5)
    assert answer.value.code == 401 and "/token" in answer.value.headers["WWW-Authenticate"]
    ca = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    version = cluster.kubectl("exec", "-n", ns, "echo", "--", "/echo-server", "get",
                              "https://kubernetes.default.svc.cluster.local:443/version", ca, check=False)
    if version.returncode != 0:  # no cluster DNS: the Service IP, as in-cluster clients use it
        version = cluster.kubectl("exec", "-n", ns, "echo", "--", "/echo-server", "get",
                                  f"https://{node._kubernetes_service_ip()}:443/version", ca)
    assert version.stdout.startswith("200 ") and '"gitVersion": "v1.36.3"' in version.stdout


@pytest.fixture
def outside(real):
    """A listener on a network beyond the node (a namespace behind a veth pair this test creates)."""
    netns, host_end, ns_end = "ef-outside-test", "efout0", "efout1"
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", netns)
    server = None
    try:
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end, "netns", netns)
        run("ip", "addr", "add", "198.18.0.1/30", "dev", host_end)
        run("ip", "link", "set", host_end, "up")
        for cmd in (("addr", "add", "198.18.0.2/30", "dev", ns_end), ("link", "set", ns_end, "up"),
                    ("link", "set", "lo", "up"), ("route", "add", "default", "via", "198.18.0.1")):
            run("ip", "netns", "exec", netns, "ip", *cmd)
        server = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-m", "http.server", "8080", "--bind",
                                   "198.18.0.2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _safe_get("http://198.18.0.2:8080/") is not None, timeout=20,
                 what="the outside listener reachable from the host")
        yield "http://198.18.0.2:8080/"
    finally:
        if server:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def test_pods_reach_nothing_beyond_the_node(cluster, served, outside):
    ns, _ = served
    # the host reaches the listener (fixture), and forwarding is on, yet a pod's packets never leave the bridge
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    denied = cluster.kubectl("exec", "-n", ns, "echo", "--", "/echo-server", "get", outside, check=False)
    assert denied.returncode != 0 and "Timeout" in denied.stderr + denied.stdout


def test_images_pull_by_every_name_of_the_dev_registry(cluster, real, served, echo_image):
    """The registry's loopback name, its name for pods and ghcr.io (mirrored to it) all pull over plain HTTP."""
    ns, _ = served
    path = echo_image.split("/", 1)[1]
    pods = {"by-pod-address": f"{cluster.pod_registry}/{path}", "by-ghcr-mirror": f"ghcr.io/{path}"}
    apply(cluster, ns, [echo_pod(name, image, real["name"]) for name, image in pods.items()])
    for name, image in pods.items():
        wait_for(lambda n=name: is_ready(get(cluster, ns, "pod", n)), timeout=90, what=f"pod {name} ({image}) Ready")
    listed = node._ctr(cluster.state, "images", "ls", "-q").stdout.split()
    assert set(pods.values()) <= set(listed)  # containerd resolved each name itself
