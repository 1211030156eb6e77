"""The dev cluster's real node: containerd, runc, a CNI bridge, kubelet and kube-proxy on this machine.

One real node per machine (kube-proxy owns the host's KUBE-* iptables chains). Everything it writes lives
under the cluster's state directory except what the kernel keeps globally; `stop` removes all of it:
processes (shims and pod processes included, found by their containerd address and cgroup), mounts,
network namespaces, the bridge, iptables rules and ip_forward.

Pods reach the node and each other, nothing else: no masquerade, and forwarding off the bridge is dropped.
From pods, the registry is at NODE_IP:<registry port> and the API server at the `kubernetes` Service
(both DNATed to the loopback listeners, so the control plane never listens beyond loopback).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gzip
import hashlib
import io
import ipaddress
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import edgefleet
import yaml

from .. import toolchain as components
from ..net import POD_CIDR, SERVICE_CIDR, free_port
from . import procs

NODE_IP = "10.245.0.1"  # lives only on the bridge; kwok's fake pod IPs use 10.244.0.0/16
POD_SUBNET = "10.245.0.0/24"
BRIDGE = "edgefleet0"
NETWORK = "edgefleet"  # CNI network name
CGROUP_ROOT = "edgefleet"  # kubelet's cgroup root, under each cgroup v1 controller (or the v2 root)
CHAIN = "EDGEFLEET"  # our iptables chains: EDGEFLEET-PRE (nat), EDGEFLEET-FWD (filter)
TAINT = {"key": "edgefleet.io/real-node", "value": "true", "effect": "NoSchedule"}
PROCESSES = ["containerd", "kubelet", "kube-proxy"]
NEEDS = components.NODE_COMPONENTS
CLAIM = Path("/run/edgefleet/real-node")  # which cluster's state holds this machine's real node
INSTALL = "apt-get install -y --no-install-recommends runc iptables"
NFD_CPUID = "feature.node.kubernetes.io/cpu-cpuid."
# folders containerd, CNI and the kubelet create outside the state directory (removed again if they made them)
HOST_DIRS = ["/run/containerd/s", "/run/containerd", "/var/lib/cni/results", "/var/lib/cni", "/var/log/containers",
             str(CLAIM.parent)]
# the kubelet's own iptables chains (table, chain, hooks that jump to it)
KUBELET_CHAINS = [("filter", "KUBE-FIREWALL", ("INPUT", "OUTPUT")), ("filter", "KUBE-KUBELET-CANARY", ()),
                  ("nat", "KUBE-KUBELET-CANARY", ()), ("mangle", "KUBE-KUBELET-CANARY", ()),
                  ("mangle", "KUBE-IPTABLES-HINT", ())]
PROFILES = Path(edgefleet.__file__).resolve().parent / "profiles"


class NodeError(RuntimeError):
    """The real node cannot run here or did not start; the message says what to do."""


# ---------------------------------------------------------------- can this host run it?


def cannot_run(state: Path | None = None) -> str | None:
    """Why this host cannot run a real node (None when it can)."""
    if platform.system() != "Linux":
        return "a real node needs Linux (kubelet, containerd and runc)"
    if os.geteuid() != 0:
        return "a real node needs root (it creates a bridge, iptables rules, mounts and cgroups)"
    missing = [tool for tool in ("runc", "iptables", "ip") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH; install them: {INSTALL} iproute2"
    if not _has_caps(("CAP_NET_ADMIN", 12), ("CAP_SYS_ADMIN", 21)):
        return "a real node needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run outside an unprivileged container)"
    if not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
        return "the br_netfilter kernel module is not loaded (Services need it): run `modprobe br_netfilter`"
    holder = claim_holder()
    if holder is not None and holder != state:
        return (f"this machine's real node belongs to the cluster in {holder}; stop it with "
                f"`edgefleet cluster down --name {holder.name} --only-real-node` (or that whole cluster)")
    return None


def _has_caps(*caps: tuple[str, int]) -> bool:
    status = Path("/proc/self/status").read_text()
    found = re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M)
    eff = int(found.group(1), 16) if found else 0
    return all(eff >> bit & 1 for _, bit in caps)


def claim_holder() -> Path | None:
    """The state directory of the cluster whose real node runs on this machine (None: none does)."""
    try:
        state = Path(CLAIM.read_text().strip())
    except OSError:
        return None
    return state if procs.alive(state, "kubelet") or procs.alive(state, "containerd") else None


# ---------------------------------------------------------------- labels


def machine_labels(cpuinfo: str | None = None, profiles: Path = PROFILES) -> dict[str, str]:
    """This machine's arch and the NFD CPU-feature labels the built-in profiles select on."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(f.replace("_", "").lower() for f in line.split(":", 1)[1].split())
    labels = {"edgefleet.io/real-node": "true", "edgefleet.io/device": "this-machine"}
    for key in _profile_label_keys(profiles):
        if key.startswith(NFD_CPUID) and key.removeprefix(NFD_CPUID).replace("_", "").lower() in flags:
            labels[key] = "true"
    return labels


def _profile_label_keys(profiles: Path) -> set[str]:
    keys = set()
    for path in profiles.glob("*.yaml"):
        selector = (yaml.safe_load(path.read_text()) or {}).get("spec", {}).get("nodeSelector", {})
        keys.update(selector.get("matchLabels", {}))
        keys.update(e["key"] for e in selector.get("matchExpressions", []))
    return keys


def node_name() -> str:
    name = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower()).strip("-")[:63]
    return name or "real-node"


# ---------------------------------------------------------------- the sandbox (pause) image


@dataclass(frozen=True)
class SandboxImage:
    ref: str
    archive: Path  # OCI image layout as a tar, for `ctr images import`


def sandbox_image(state: Path) -> SandboxImage:
    """The pod sandbox image: the one place that decides its reference and archive. Until
    `edgefleet images build --only pause` provides one, it is packed here from the cached pause program."""
    components.build_all(echo=lambda _: None, names=["pause"], live=False)
    comp = components.COMPONENTS["pause"]
    ref = f"ghcr.io/edgefleet/pause:{comp.version.lstrip('v')}"
    archive = state / "node" / "pause.tar"
    write_oci_archive(archive, ref, {"pause": components.binary_path("pause").read_bytes()}, ["/pause"])
    return SandboxImage(ref, archive)


def write_oci_archive(path: Path, ref: str, files: dict[str, bytes], entrypoint: list[str],
                      arch: str = "amd64") -> str:
    """A one-layer image as an OCI layout tar (files at /, mode 0755, owner 0); returns the manifest digest."""
    layer_tar = _tar({name: (data, 0o755) for name, data in files.items()})
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/"], "User": "65532:65532"},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _digest(layer),
                    "size": len(layer)}],
    }).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _digest(manifest),
        "size": len(manifest),
        "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref.split(":")[-1]},
    }]}).encode()
    entries = {"oci-layout": (b'{"imageLayoutVersion":"1.0.0"}', 0o644), "index.json": (index, 0o644)}
    for blob in (layer, config, manifest):
        entries[f"blobs/sha256/{_digest(blob).split(':')[1]}"] = (blob, 0o644)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tar(entries))
    return _digest(manifest)


def _tar(entries: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def socket_path(state: Path) -> Path:
    return state / "node" / "containerd.sock"


def _ctr(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [str(components.binary_path("ctr")), "--address", str(socket_path(state)), "-n", "k8s.io", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def refresh_images(state: Path, refs: list[str]) -> list[str]:
    """Point the node's local tags among `refs` at what the registry holds now, through the node's mirror
    config: a pod naming a tag (imagePullPolicy IfNotPresent) would otherwise run whatever the tag named when
    the node first pulled it. Tags the node never pulled are left to the kubelet. Returns the refs re-pulled."""
    present = set(_ctr(state, "images", "ls", "-q").stdout.split())
    pulled = []
    for ref in refs:
        if ref not in present:
            continue
        done = _ctr(state, "images", "pull", "--hosts-dir", str(state / "node" / "certs.d"), ref, timeout=600)
        if done.returncode != 0:
            raise NodeError(f"re-pulling {ref} on the real node failed: {done.stderr.strip()[-500:]}")
        pulled.append(ref)
    return pulled


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc


# ---------------------------------------------------------------- configuration


def _containerd_config(state: Path, sandbox: str) -> str:
    node = state / "node"
    cni_bin = components.binary_path("cni-plugins")
    runc = shutil.which("runc")
    return f"""version = 3
root = "{node / 'containerd' / 'root'}"
state = "{node / 'containerd' / 'state'}"

[grpc]
  address = "{socket_path(state)}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true  # no CAP_SYS_RESOURCE here: nothing may lower oom_score_adj
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{node / 'cni'}"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      runtime_path = "{components.binary_path('containerd-shim-runc-v2')}"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{node / 'runc'}"
        SystemdCgroup = false

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{sandbox}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{node / 'certs.d'}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.internal.v1.opt"]
  path = "{node / 'opt'}"
"""


def _write_registry_hosts(node: Path, registry_port: int) -> None:
    """The dev registry over plain HTTP, by its loopback name, its name for pods, and as ghcr.io's mirror
    (the images edgefleet builds are named ghcr.io/edgefleet/...)."""
    local = f"http://127.0.0.1:{registry_port}"
    for host, server in ((f"127.0.0.1:{registry_port}", local), (f"{NODE_IP}:{registry_port}", local),
                         ("ghcr.io", "https://ghcr.io")):
        folder = node / "certs.d" / host
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(
            f'server = "{server}"\n\n[host."{local}"]\n  capabilities = ["pull", "resolve"]\n'
        )


def _cni_config(node: Path) -> str:
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(node / "cni-ipam"),
                      "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=2)


def _kubelet_config(state: Path, ports: dict[str, int]) -> dict:
    node, pki = state / "node", state / "pki"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet-healthz"],
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "AlwaysAllow"},  # only the API server holds a client cert this CA signed
        "containerRuntimeEndpoint": f"unix://{socket_path(state)}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "failCgroupV1": False,  # this kind of machine has cgroup v1 (hybrid)
        "failSwapOn": False,
        "podLogsDir": str(node / "pod-logs"),
        "registerWithTaints": [TAINT],
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "shutdownGracePeriod": "0s",
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
        "imageGCHighThresholdPercent": 98,
        "imageGCLowThresholdPercent": 95,
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
    }


def _kube_proxy_config(state: Path, ports: dict[str, int], name: str) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(state / "kube-proxy.kubeconfig")},
        "hostnameOverride": name,
        "clusterCIDR": POD_SUBNET,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{ports['kube-proxy-healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['kube-proxy-metrics']}",
        "nodePortAddresses": [f"{NODE_IP}/32"],  # NodePorts on the bridge only, never on the host's NICs
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


# ---------------------------------------------------------------- network


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("iptables", "-w", "5", *args, check=check)


def _network_up(state: Path, ports: dict[str, int]) -> None:
    node = state / "node"
    _remove_chains()  # left by a node that crashed
    if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "replace", f"{NODE_IP}/{POD_SUBNET.split('/')[1]}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    # kube-proxy also DNATs Service traffic to kwok's fake pod IPs: fail fast here, never route it out
    _run("ip", "route", "replace", "blackhole", _kwok_pod_network())
    Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").write_text("1")  # DNAT to loopback, bridge only
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    (node / "ip_forward.before").write_text(forward.read_text())
    forward.write_text("1")
    _iptables("-t", "nat", "-N", f"{CHAIN}-PRE")
    for port_name, dest in (("registry", NODE_IP), ("kube-apiserver", _kubernetes_service_ip())):
        port = ports[port_name]
        dport = "443" if port_name == "kube-apiserver" else str(port)
        _iptables("-t", "nat", "-A", f"{CHAIN}-PRE", "-d", dest, "-p", "tcp", "--dport", dport,
                  "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}")
    _iptables("-t", "nat", "-I", "PREROUTING", "1", "-i", BRIDGE, "-j", f"{CHAIN}-PRE")
    # the host reaches the registry at the node IP too, so one address serves the operator and the pods
    _iptables("-t", "nat", "-I", "OUTPUT", "1", "-d", f"{NODE_IP}/32", "-j", f"{CHAIN}-PRE")
    _iptables("-N", f"{CHAIN}-FWD")
    _iptables("-A", f"{CHAIN}-FWD", "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP")  # pods reach nothing else
    _iptables("-A", f"{CHAIN}-FWD", "-o", BRIDGE, "!", "-i", BRIDGE, "-j", "DROP")  # nor does the network them
    _iptables("-I", "FORWARD", "1", "-j", f"{CHAIN}-FWD")


def _kwok_pod_network() -> str:
    return str(ipaddress.ip_network(POD_CIDR, strict=False))


def _kubernetes_service_ip() -> str:
    return str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))


def _network_down(state: Path) -> list[str]:
    problems = _remove_chains()
    _run("ip", "route", "del", "blackhole", _kwok_pod_network(), check=False)
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        if _run("ip", "link", "del", BRIDGE, check=False).returncode != 0:
            problems.append(f"bridge {BRIDGE}")
    before = state / "node" / "ip_forward.before"
    if before.exists():
        Path("/proc/sys/net/ipv4/ip_forward").write_text(before.read_text())
    return problems


def _remove_chains() -> list[str]:
    problems = []
    hooks: tuple[tuple[str, str, list[str]], ...] = (("nat", "PREROUTING", ["-i", BRIDGE]),
                                                     ("nat", "OUTPUT", ["-d", f"{NODE_IP}/32"]),
                                                     ("filter", "FORWARD", []))
    for table, hook, args in hooks:  # every jump first: a chain still jumped to cannot be deleted
        chain = f"{CHAIN}-PRE" if table == "nat" else f"{CHAIN}-FWD"
        while _iptables("-t", table, "-D", hook, *args, "-j", chain, check=False).returncode == 0:
            pass
    for table, chain in (("nat", f"{CHAIN}-PRE"), ("filter", f"{CHAIN}-FWD")):
        if _iptables("-t", table, "-L", chain, "-n", check=False).returncode == 0:
            _iptables("-t", table, "-F", chain, check=False)
            if _iptables("-t", table, "-X", chain, check=False).returncode != 0:
                problems.append(f"iptables chain {table}/{chain}")
    return problems


# ---------------------------------------------------------------- start


def start(state: Path, ports: dict[str, int], echo: Callable[[str], None], timeout: float) -> dict:
    """Start containerd, kubelet and kube-proxy for the cluster in `state`; returns the node's info."""
    if len(str(socket_path(state))) > 100:  # a unix socket path has at most 107 bytes
        raise NodeError(f"containerd's socket {socket_path(state)} would be too long for a unix socket; "
                        "set EDGEFLEET_CACHE to a shorter folder")
    lock = components.cache_dir() / "locks" / "real-node.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # check and claim at once: a second `up` waits, then sees the claim
        reason = cannot_run(state)
        if reason:
            raise NodeError(f"cannot start the real node: {reason}")
        node = state / "node"
        node.mkdir(parents=True, exist_ok=True)
        (node / "host-dirs-made.json").write_text(json.dumps([d for d in HOST_DIRS if not Path(d).exists()]))
        CLAIM.parent.mkdir(parents=True, exist_ok=True)
        CLAIM.write_text(str(state))
        return _start_node(state, ports, echo, timeout)


def _start_node(state: Path, ports: dict[str, int], echo: Callable[[str], None], timeout: float) -> dict:
    node = state / "node"
    name = node_name()
    ports = {**ports, **{k: free_port() for k in ("kubelet", "kubelet-healthz", "kube-proxy-healthz",
                                                     "kube-proxy-metrics")}}
    labels = machine_labels()
    info = {"name": name, "ip": NODE_IP, "podSubnet": POD_SUBNET, "bridge": BRIDGE, "labels": labels,
            "taint": TAINT, "ports": {k: ports[k] for k in ("kubelet", "kubelet-healthz")},
            # a hostPath for the operator's node cache (EDGEFLEET_NODE_CACHE) that `down` removes with the state
            "nodeCache": str(node / "model-cache")}
    (node / "node.json").write_text(json.dumps(info, indent=2))
    _network_up(state, ports)
    _issue_certs(state, name)
    server = f"https://127.0.0.1:{ports['kube-apiserver']}"
    procs.write_kubeconfig(state / "kubelet.kubeconfig", server, state / "pki", "kubelet-client")
    procs.write_kubeconfig(state / "kube-proxy.kubeconfig", server, state / "pki", "kube-proxy")

    _make_cgroup_root()
    echo("starting containerd")
    _start_containerd(state, ports["registry"], timeout)
    (node / "kubelet.yaml").write_text(yaml.safe_dump(_kubelet_config(state, ports)))
    (node / "kube-proxy.yaml").write_text(yaml.safe_dump(_kube_proxy_config(state, ports, name)))
    echo(f"starting kubelet (node {name}, {NODE_IP}) and kube-proxy")
    procs.start(state, "kubelet", [
        f"--config={node / 'kubelet.yaml'}", f"--kubeconfig={state / 'kubelet.kubeconfig'}",
        f"--root-dir={node / 'kubelet'}", f"--hostname-override={name}", f"--node-ip={NODE_IP}",
        "--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())), "--v=1",
    ])
    procs.start(state, "kube-proxy", [f"--config={node / 'kube-proxy.yaml'}", "--v=1"])
    return info


def _start_containerd(state: Path, registry_port: int, timeout: float) -> None:
    """Write containerd's and CNI's configuration, start containerd and import the sandbox image."""
    node = state / "node"
    sandbox = sandbox_image(state)
    _write_registry_hosts(node, registry_port)
    (node / "containerd.toml").write_text(_containerd_config(state, sandbox.ref))
    (node / "cni").mkdir(exist_ok=True)
    (node / "cni" / "10-edgefleet.conflist").write_text(_cni_config(node))
    procs.start(state, "containerd", ["--config", str(node / "containerd.toml"), "--log-level", "warn"])
    procs.wait("containerd", lambda: _ctr(state, "version", timeout=5).returncode == 0, timeout, state, "containerd")
    imported = _ctr(state, "images", "import", "--local", str(sandbox.archive))
    if imported.returncode != 0:
        raise NodeError(f"importing the sandbox image {sandbox.ref} failed: {imported.stderr.strip()}")


def wait_ready(cluster, info: dict, timeout: float) -> None:
    jsonpath = 'jsonpath={.status.conditions[?(@.type=="Ready")].status}'

    def ready() -> bool:
        return cluster.kubectl("get", "node", info["name"], "-o", jsonpath, check=False).stdout == "True"

    procs.wait(f"the real node {info['name']} Ready", ready, timeout, cluster.state, "kubelet")


def _issue_certs(state: Path, name: str) -> None:
    from .pki import CertificateAuthority

    ca = CertificateAuthority.load(state / "pki")
    ca.issue("kubelet-client", f"system:node:{name}", org="system:nodes")
    ca.issue("kubelet-serving", name, server=True, ips=(NODE_IP,), names=(name,))
    ca.issue("kube-proxy", "system:kube-proxy")



def _make_cgroup_root() -> None:
    for ctrl in _cgroup_roots():
        (ctrl / CGROUP_ROOT).mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):  # a new v1 cpuset starts empty: no task could join it
            if (ctrl / name).exists() and not (ctrl / CGROUP_ROOT / name).read_text().strip():
                (ctrl / CGROUP_ROOT / name).write_text((ctrl / name).read_text())


def _cgroup_roots() -> list[Path]:
    """Each cgroup v1 controller hierarchy (or the v2 root) the kubelet creates its cgroups under."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists())


# ---------------------------------------------------------------- stop


def stop(state: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Stop the real node of the cluster in `state` and remove everything it made; returns what it stopped.
    Safe to call when no node was started or after a crash."""
    node = state / "node"
    if not node.exists():
        return []
    holder = claim_holder()
    ours = holder in (None, state)  # else another cluster's node runs: its pods, cgroups and network stay
    stopped = [n for n in ("kube-proxy", "kubelet") if procs.stop(state, n)]
    killed = (_kill_pods() if ours else 0) + _kill_shims(state)
    if procs.stop(state, "containerd"):
        stopped.append("containerd")
    if killed:
        stopped.append(f"{killed} pod/shim processes")
    problems = _unmount_under(state)
    if ours:
        problems += _clean_machine(state)
    else:
        echo(f"left the machine's network, iptables and cgroups alone: they belong to the real node of {holder}")
    if problems:
        echo("could not remove: " + "; ".join(problems))
    return stopped


def _clean_machine(state: Path) -> list[str]:
    """What a real node changes outside its state directory: iptables, cgroups, bridge, route, files."""
    problems = _cleanup_iptables_of_kube_proxy() + _remove_kubelet_chains() + _remove_portmap_chains()
    problems += _remove_cgroups()
    problems += _network_down(state)
    _remove_host_leftovers(state / "node")
    with contextlib.suppress(OSError):
        CLAIM.unlink()
    _remove_host_dirs(state / "node")
    return problems


def _pids_in_cgroups() -> set[int]:
    pids: set[int] = set()
    for ctrl in _cgroup_roots():
        # os.walk skips a directory that vanishes during the walk (a pod's cgroup going away); rglob raised
        for folder, _, files in os.walk(ctrl / CGROUP_ROOT):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in (Path(folder) / "cgroup.procs").read_text().split())
    return pids


def _kill_pods(timeout: float = 10) -> int:
    """SIGKILL every process in the kubelet's cgroups (the pods' containers and sandboxes)."""
    deadline, killed = time.monotonic() + timeout, set()
    while (pids := _pids_in_cgroups()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        time.sleep(0.1)
    return len(killed)


def _shim_pids(state: Path) -> list[int]:
    shim, address = str(components.binary_path("containerd-shim-runc-v2")), str(socket_path(state))
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            args = [a.decode(errors="replace") for a in argv]
            if args and args[0] == shim and "-address" in args and address in args:
                pids.append(int(proc.name))
    return pids


def _kill_shims(state: Path, timeout: float = 5) -> int:
    pids = _shim_pids(state)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _shim_pids(state) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _shim_pids(state):
            break
    return len(pids)


def _cleanup_iptables_of_kube_proxy() -> list[str]:
    binary = components.binary_path("kube-proxy")
    if not binary.exists():
        return []
    proc = subprocess.run([str(binary), "--cleanup"], capture_output=True, text=True, timeout=60)
    return [] if proc.returncode == 0 else [f"kube-proxy --cleanup: {proc.stderr.strip()[-300:]}"]


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def _unmount_under(state: Path) -> list[str]:
    """Unmount everything mounted under the state directory, deepest first (kubelet volumes, container
    root filesystems, network namespaces)."""
    problems = []
    for _ in range(5):
        mounts = mounts_under(state)
        if not mounts:
            return []
        for mount in sorted(mounts, key=len, reverse=True):
            if _libc.umount2(mount.encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (22, 2):
                problems.append(f"mount {mount}: {os.strerror(ctypes.get_errno())}")
    return problems or [f"mounts under {state}"]


def mounts_under(state: Path) -> list[str]:
    """Mount points below `state` (deleting a folder with a mount below it would delete the mounted files)."""
    prefix = str(state.resolve()) + "/"
    return [m for m in _mountpoints() if m.startswith(prefix)]


def _mountpoints() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(point.encode().decode("unicode_escape"))
    return points


def _remove_cgroups() -> list[str]:
    problems = []
    for ctrl in _cgroup_roots():
        top = ctrl / CGROUP_ROOT
        if not top.exists():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        try:
            top.rmdir()
        except OSError as err:
            problems.append(f"cgroup {top}: {err.strerror}")
    return problems


def _remove_kubelet_chains() -> list[str]:
    problems = []
    for tool in ("iptables", "ip6tables"):
        for table, chain, hooks in KUBELET_CHAINS:
            if _run(tool, "-w", "5", "-t", table, "-n", "-L", chain, check=False).returncode != 0:
                continue
            for hook in hooks:
                while _run(tool, "-w", "5", "-t", table, "-D", hook, "-j", chain, check=False).returncode == 0:
                    pass
            _run(tool, "-w", "5", "-t", table, "-F", chain, check=False)
            if _run(tool, "-w", "5", "-t", table, "-X", chain, check=False).returncode != 0:
                problems.append(f"{tool} chain {table}/{chain}")
    return problems


def _remove_portmap_chains() -> list[str]:
    """The portmap plugin's nat chains (hostPort): a pod killed without a CNI DEL leaves them behind."""
    problems = []
    for tool in ("iptables", "ip6tables"):
        rules = _run(f"{tool}-save", "-t", "nat", check=False).stdout.splitlines()
        chains = [line[1:].split()[0] for line in rules if line.startswith((":CNI-HOSTPORT-", ":CNI-DN-"))]
        for line in rules:  # jumps from the built-in chains to them
            words = shlex.split(line)
            if words[:1] == ["-A"] and words[1] in ("PREROUTING", "OUTPUT", "POSTROUTING") and \
                    words[-1] in chains:
                _run(tool, "-w", "5", "-t", "nat", "-D", *words[1:], check=False)
        for chain in chains:
            _run(tool, "-w", "5", "-t", "nat", "-F", chain, check=False)
        for chain in chains:
            if _run(tool, "-w", "5", "-t", "nat", "-X", chain, check=False).returncode != 0:
                problems.append(f"{tool} chain nat/{chain}")
    return problems


def _remove_host_dirs(node: Path) -> None:
    """Remove the folders outside the state directory that this node created, when empty."""
    with contextlib.suppress(OSError, ValueError):
        for folder in json.loads((node / "host-dirs-made.json").read_text()):
            with contextlib.suppress(OSError):
                Path(folder).rmdir()


def _remove_host_leftovers(node: Path) -> None:
    """Files the kubelet and CNI keep outside the state directory: log symlinks and CNI result caches."""
    logs = str(node / "pod-logs")
    for link in Path("/var/log/containers").glob("*.log"):
        with contextlib.suppress(OSError):
            if os.readlink(link).startswith(logs):
                link.unlink()
    results = Path("/var/lib/cni/results")
    for cached in results.glob(f"{NETWORK}-*"):  # <network>-<sandbox id>-<interface>
        sandbox = cached.name.removeprefix(f"{NETWORK}-").rsplit("-", 1)[0]
        (results / f"cni-loopback-{sandbox}-lo").unlink(missing_ok=True)
        cached.unlink(missing_ok=True)
