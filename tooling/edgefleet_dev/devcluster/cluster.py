"""Start, inspect and stop a loopback control plane with a kwok fleet and an OCI registry.

Every process is started detached with a pid file under the cluster's state directory, so `down`
(or a later `up` after a crash) can find and stop exactly what `up` started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from edgefleet import registry_token

from .. import toolchain as components
from ..net import POD_CIDR, SERVICE_CIDR, free_port
from . import node, procs
from .fleet import load_fleet
from .pki import CertificateAuthority, service_account_key
from .procs import ClusterError

STAGES = Path(__file__).resolve().parent / "stages.yaml"
# start order; each entry waits for the ones before it
PROCESSES = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "registry",
             "registry-front"]
REGISTRY_SERVICE = "edgefleet-registry"  # the token service's name: the audience of the pods' registry tokens
# Who may push to the dev registry (edgefleet.registry_token; docs/security.md): anyone pulls; this machine (the
# tests, the tooling, an operator run from a checkout) does anything; the chart's operator, and the Jobs'
# ServiceAccount of any operator namespace (tests run operators in namespaces of their own; a real policy names
# the one operator namespace) push the stores the tests choose; any other pod on a node only its namespace's
# tenant repositories.
REGISTRY_POLICY = {
    "anonymous": ["pull"],
    "trustedAddresses": ["127.0.0.1", node.NODE_IP],
    "rules": [
        {"serviceAccount": "edgefleet-system/edgefleet", "repositories": ["*"], "actions": ["pull", "push", "delete"]},
        {"serviceAccount": "*/edgefleet-jobs", "repositories": ["*"], "actions": ["pull", "push"]},
        {"serviceAccount": "*/*", "requireNode": True,
         "repositories": ["edgefleet/tenants/{namespace}", "edgefleet/tenants/{namespace}/*"],
         "actions": ["pull", "push"]},
    ],
}


def state_dir(name: str = "default") -> Path:
    return components.cache_dir() / "clusters" / name


@dataclass
class Cluster:
    """A handle on a running (or starting) dev cluster."""

    state: Path

    @property
    def info(self) -> dict:
        return json.loads((self.state / "cluster.json").read_text())

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def registry(self) -> str:
        return f"127.0.0.1:{self.info['ports']['registry']}"

    @property
    def real_node(self) -> dict | None:
        """The real node's name, IP, labels and ports (None when the cluster has none)."""
        return self.info.get("realNode")

    @property
    def pod_registry(self) -> str:
        """The registry's address as pods on the real node reach it."""
        return f"{node.NODE_IP}:{self.info['ports']['registry']}"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.info['ports']['kube-apiserver']}"

    def bin(self, name: str) -> Path:
        return components.binary_path(name)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120):
        cmd = [str(self.bin("kubectl")), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def helm(self, *args: str, check: bool = True, timeout: float = 300):
        cmd = [str(self.bin("helm")), "--kubeconfig", str(self.kubeconfig), *args]
        env = {**os.environ, "HELM_CACHE_HOME": str(self.state / "helm" / "cache"),
               "HELM_CONFIG_HOME": str(self.state / "helm" / "config"),
               "HELM_DATA_HOME": str(self.state / "helm" / "data")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise ClusterError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def env(self) -> dict[str, str]:
        """Environment for child processes: kubectl and helm on PATH, KUBECONFIG set."""
        bindir = self.state / "bin"
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{bindir}:{os.environ['PATH']}"}

    def running(self) -> dict[str, bool]:
        names = PROCESSES + (node.PROCESSES if self.real_node else [])
        return {name: procs.alive(self.state, name) for name in names}

    def nodes_ready(self) -> tuple[int, int]:
        out = self.kubectl(
            "get", "nodes", "-o",
            'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
            check=False,
        ).stdout.split()
        return sum(1 for s in out if s == "True"), len(out)


def _https_ok(url: str, state: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(state / "pki" / "ca.crt"))
    ctx.load_cert_chain(state / "pki" / "admin.crt", state / "pki" / "admin.key")
    with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
        return resp.status == 200


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


# ---------------------------------------------------------------- configuration files


def _write_pki(state: Path) -> Path:
    pki = state / "pki"
    pki.mkdir(parents=True)
    ca = CertificateAuthority(pki)
    # pods reach the API server as the `kubernetes` Service (its first IP) and by its DNS names
    ca.issue("apiserver", "kube-apiserver", server=True, ips=(node._kubernetes_service_ip(),),
             names=("kubernetes", "kubernetes.default", "kubernetes.default.svc.cluster.local"))
    ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client")  # for logs, exec, port-forward
    ca.issue("admin", "edgefleet-admin", org="system:masters")
    ca.issue("controller-manager", "system:kube-controller-manager")
    ca.issue("scheduler", "system:kube-scheduler")
    service_account_key(pki / "sa.key")
    return pki


def _write_configs(state: Path, ports: dict[str, int]) -> None:
    """The components' configuration files and the registry's token key, once per cluster (``_args`` only reads
    them, so a component restarted later finds the same)."""
    (state / "scheduler.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(state / "scheduler.kubeconfig"), "qps": 300, "burst": 600},
        "leaderElection": {"leaderElect": False},
    }))
    key = state / "pki" / "registry-token.key"
    key.write_bytes(registry_token.new_key())
    key.chmod(0o600)
    (state / "registry-token.jwks").write_text(json.dumps(registry_token.jwks(key.read_bytes())))
    (state / "registry-policy.yaml").write_text(yaml.safe_dump(REGISTRY_POLICY))
    (state / "registry.yaml").write_text(yaml.safe_dump({
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(state / "registry")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{ports['registry-store']}"},  # only the front (registry_front.py) talks to it
        "auth": {"token": {"realm": f"http://127.0.0.1:{ports['registry']}/token", "autoredirect": True,
                           "autoredirectpath": "/token", "service": REGISTRY_SERVICE, "issuer": "edgefleet",
                           "jwks": str(state / "registry-token.jwks")}},
    }))


def _args(state: Path, ports: dict[str, int]) -> dict[str, list[str]]:
    pki = state / "pki"
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    return {
        "etcd": [
            "--name=default", f"--data-dir={state / 'etcd'}", f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}", f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}", f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync=true", "--log-level=warn", "--quota-backend-bytes=4294967296",
        ],
        "kube-apiserver": [
            f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={ports['kube-apiserver']}", f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.key'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            "--endpoint-reconciler-type=none", "--max-requests-inflight=1000",
            "--max-mutating-requests-inflight=500", "--profiling=false", "--event-ttl=1h",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}", "--kubelet-preferred-address-types=InternalIP",
        ],
        "kube-controller-manager": [
            f"--kubeconfig={state / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={state / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={state / 'controller-manager.kubeconfig'}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=true", "--controllers=*", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={ports['kube-controller-manager']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--kube-api-qps=300", "--kube-api-burst=600",
            "--concurrent-daemonset-syncs=4", "--concurrent-deployment-syncs=10",
        ],
        "kube-scheduler": [
            f"--config={state / 'scheduler.yaml'}", "--bind-address=127.0.0.1",
            f"--secure-port={ports['kube-scheduler']}",
            f"--authentication-kubeconfig={state / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={state / 'scheduler.kubeconfig'}",
        ],
        "kwok": [
            f"--kubeconfig={state / 'kubeconfig'}", f"--config={STAGES}",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",  # never the real node
            f"--cidr={POD_CIDR}", "--node-ip=10.240.0.1", "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports['kwok']}",
        ],
        "registry": ["serve", str(state / "registry.yaml")],
        "registry-front": ["-m", "edgefleet_dev.devcluster.registry_front", f"--listen=127.0.0.1:{ports['registry']}",
                           f"--upstream=127.0.0.1:{ports['registry-store']}", f"--key={pki / 'registry-token.key'}",
                           f"--policy={state / 'registry-policy.yaml'}", f"--service={REGISTRY_SERVICE}",
                           f"--kubeconfig={state / 'kubeconfig'}"],
    }


# ---------------------------------------------------------------- up / down / status


@contextlib.contextmanager
def _up_lock(state: Path) -> Iterator[None]:
    state.mkdir(parents=True, exist_ok=True)
    with (state.parent / f".{state.name}.lock").open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise ClusterError(
                f"another `edgefleet cluster up` is in progress for {state} (pid {fh.read().strip() or '?'}); "
                "wait for it, or stop it with `edgefleet cluster down`"
            ) from None
        fh.truncate(0)
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def is_running(name: str = "default") -> bool:
    state = state_dir(name)
    return (state / "cluster.json").exists() and all(Cluster(state).running().values())


def up(name: str = "default", fleet: str | Path | None = None, scale: int | None = None,
       echo: Callable[[str], None] = print, timeout: float = 180, real_node: bool = False,
       with_node: Callable[[Cluster], object] | None = None) -> Cluster:
    """Build what is missing, start the control plane, create the fleet, wait until every node is Ready.
    With `real_node`, also start this machine as a node that runs real pods (see node.py), then call
    `with_node(cluster)` (the tooling's stack pushes the built images there)."""
    state = state_dir(name)
    fleet_spec = load_fleet(fleet)  # validate before touching anything
    nodes = fleet_spec.nodes(scale)
    if real_node and (reason := node.cannot_run(state)):
        raise ClusterError(f"--real-node: {reason}")
    with _up_lock(state):
        if is_running(name):
            cluster = Cluster(state)
            if real_node and not cluster.real_node:
                _add_real_node(cluster, echo, timeout)
            if real_node and with_node:
                with_node(cluster)
            echo(f"cluster {name!r} is already running (kubeconfig {state / 'kubeconfig'}); "
                 "`edgefleet cluster down` stops it")
            return cluster
        if any(procs.pidfile(state, p).exists() for p in PROCESSES + node.PROCESSES):
            echo(f"cleaning up a cluster {name!r} that did not stop cleanly")
            _teardown(state)
        components.build_all(echo=echo, names=components.control_plane() + (list(node.NEEDS) if real_node else []))
        started = time.monotonic()
        try:
            cluster = _start_all(state, echo, timeout)
            _create_fleet(cluster, fleet_spec.cluster_objects() + nodes, echo, timeout)
            if real_node:
                _add_real_node(cluster, echo, timeout)
                if with_node:
                    with_node(cluster)
        except BaseException:
            echo(f"start failed; logs are in {state / 'logs'}")
            _teardown(state, keep_logs=True)
            raise
        procs.started_here.add(name)
        extra = f" + real node {cluster.real_node['name']}" if real_node and cluster.real_node else ""
        echo(f"cluster {name!r} ready in {time.monotonic() - started:.1f}s: {len(nodes)} nodes{extra}, "
             f"kubeconfig {cluster.kubeconfig}, registry {cluster.registry}")
        return cluster


def stop_real_node(name: str = "default", echo: Callable[[str], None] = print) -> list[str]:
    """Stop a cluster's real node and remove everything it made; the control plane and fleet keep running."""
    cluster = Cluster(state_dir(name))
    stopped = node.stop(cluster.state, echo=echo)
    info = cluster.info
    real = info.pop("realNode", None) or {"name": node.node_name()}
    cluster.kubectl("delete", "node", real["name"], "--ignore-not-found", "--wait=false", check=False)
    (cluster.state / "cluster.json").write_text(json.dumps(info, indent=2))
    _refuse_mounts(cluster.state)
    shutil.rmtree(cluster.state / "node", ignore_errors=True)
    return stopped


def _refuse_mounts(state: Path) -> None:
    if mounts := node.mounts_under(state):
        raise ClusterError(f"{len(mounts)} mounts are still below {state} (e.g. {mounts[0]}); not deleting it. "
                           f"Unmount them (`umount -R {state}`) and run `edgefleet cluster down` again")


def _add_real_node(cluster: Cluster, echo, timeout: float) -> None:
    """Start the real node beside a running control plane and wait until it is Ready."""
    if not (cluster.state / "pki" / "apiserver-kubelet-client.crt").exists():
        raise ClusterError("this cluster was started by an older edgefleet whose API server cannot reach a "
                           "kubelet; restart it (`edgefleet cluster down` then `up --real-node`)")
    components.build_all(echo=echo, names=list(node.NEEDS))
    started = time.monotonic()
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "edgefleet:real-node"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                             "name": f"system:node:{node.node_name()}"}]}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(binding))
    info_path = cluster.state / "cluster.json"
    try:
        real = node.start(cluster.state, cluster.info["ports"], echo, timeout)
        info = cluster.info
        info["realNode"] = real
        info["versions"].update({n: components.COMPONENTS[n].version for n in node.NEEDS})
        info_path.write_text(json.dumps(info, indent=2))
        node.wait_ready(cluster, real, timeout)
    except BaseException as err:
        echo(f"the real node did not start; logs are in {cluster.state / 'logs'}")
        stop_real_node(cluster.state.name, echo=echo)  # leave the running control plane as it was
        if isinstance(err, node.NodeError):
            raise ClusterError(str(err)) from None
        raise
    echo(f"real node {real['name']} Ready in {time.monotonic() - started:.1f}s "
         f"({real['ip']}, pods {real['podSubnet']}, taint {real['taint']['key']})")


def _start_all(state: Path, echo, timeout: float) -> Cluster:
    for sub in ("pids", "logs", "bin", "registry"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    pki = _write_pki(state)
    ports = {k: free_port() for k in [*PROCESSES, "etcd-peer", "registry-store"]}
    server = f"https://127.0.0.1:{ports['kube-apiserver']}"
    procs.write_kubeconfig(state / "kubeconfig", server, pki, "admin")
    procs.write_kubeconfig(state / "controller-manager.kubeconfig", server, pki, "controller-manager")
    procs.write_kubeconfig(state / "scheduler.kubeconfig", server, pki, "scheduler")
    for tool in ("kubectl", "helm"):
        (state / "bin" / tool).symlink_to(components.binary_path(tool))
    versions = {n: components.COMPONENTS[n].version for n in components.COMPONENTS}
    versions["registry-front"] = "edgefleet"
    (state / "cluster.json").write_text(json.dumps({"ports": ports, "versions": versions}, indent=2))
    _write_configs(state, ports)
    args = _args(state, ports)
    echo("starting etcd")
    procs.start(state, "etcd", args["etcd"])
    procs.wait("etcd /health", lambda: _http_status(f"http://127.0.0.1:{ports['etcd']}/health") == 200, timeout,
               state, "etcd")
    echo("starting kube-apiserver")
    procs.start(state, "kube-apiserver", args["kube-apiserver"])
    procs.wait("kube-apiserver /readyz", lambda: _https_ok(f"{server}/readyz", state), timeout, state, "kube-apiserver")
    echo("starting kube-controller-manager, kube-scheduler, kwok and the OCI registry")
    for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
        procs.start(state, name, args[name])
    procs.start(state, "registry", args["registry"], env={"OTEL_TRACES_EXPORTER": "none"})
    procs.wait("the OCI registry", lambda: _http_status(f"http://127.0.0.1:{ports['registry-store']}/v2/") == 401,
               timeout, state, "registry")
    _start_front(state, ports, timeout)
    return Cluster(state)


def _start_front(state: Path, ports: dict[str, int], timeout: float) -> None:
    procs.start(state, "registry-front", _args(state, ports)["registry-front"])
    procs.wait("the registry's front (token service)",
               lambda: _http_status(f"http://127.0.0.1:{ports['registry']}/v2/") == 401, timeout, state,
               "registry-front")


def stop_registry(cluster: Cluster) -> None:
    """Stop the artifact store (its front and the registry): clients are refused as by a registry that is down."""
    for name in ("registry-front", "registry"):
        if not procs.stop(cluster.state, name):
            raise ClusterError(f"the cluster's {name} was not running")


def start_registry(cluster: Cluster, timeout: float = 30) -> None:
    """Start the artifact store again on the same ports and storage."""
    ports = cluster.info["ports"]
    procs.start(cluster.state, "registry", _args(cluster.state, ports)["registry"],
                env={"OTEL_TRACES_EXPORTER": "none"})
    procs.wait("the OCI registry", lambda: _http_status(f"http://127.0.0.1:{ports['registry-store']}/v2/") == 401,
               timeout, cluster.state, "registry")
    _start_front(cluster.state, ports, timeout)


def _create_fleet(cluster: Cluster, objects: list[dict], echo, timeout: float) -> None:
    nodes = [o for o in objects if o["kind"] == "Node"]
    echo(f"creating {len(nodes)} kwok nodes")
    for i in range(0, len(objects), 500):
        batch = {"apiVersion": "v1", "kind": "List", "items": objects[i:i + 500]}
        cluster.kubectl("create", "-f", "-", input=json.dumps(batch), timeout=300)
    last = [-1]

    def all_ready() -> bool:
        ready, total = cluster.nodes_ready()
        if ready != last[0]:
            echo(f"nodes Ready: {ready}/{len(nodes)}")
            last[0] = ready
        return total == len(nodes) and ready == total

    procs.wait("all nodes Ready", all_ready, timeout, cluster.state, "kwok")
    procs.wait("the default service account", lambda: cluster.kubectl("get", "sa", "default").returncode == 0,
          timeout, cluster.state, "kube-controller-manager")


def _teardown(state: Path, keep_logs: bool = False) -> list[str]:
    stopped = node.stop(state) if state.exists() else []
    stopped += [name for name in reversed(PROCESSES) if procs.stop(state, name)]
    _refuse_mounts(state)
    for path in sorted(state.glob("*")) if state.exists() else []:
        if keep_logs and path.name == "logs":
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stopped


def down(name: str = "default", echo: Callable[[str], None] = print) -> None:
    state = state_dir(name)
    if not state.exists():
        echo(f"cluster {name!r} is not running")
        return
    stopped = _teardown(state)
    with contextlib.suppress(OSError):
        state.rmdir()
    echo(f"cluster {name!r} stopped ({', '.join(stopped) or 'no processes were running'}); state removed")


def status(name: str = "default") -> dict:
    state = state_dir(name)
    if not (state / "cluster.json").exists():
        return {"name": name, "running": False}
    cluster = Cluster(state)
    info = cluster.info
    running = cluster.running()
    result = {
        "name": name,
        "running": all(running.values()),
        "kubeconfig": str(cluster.kubeconfig),
        "components": {
            p: {"version": info["versions"][p], "running": running[p],
                "port": info["ports"].get(p) or info.get("realNode", {}).get("ports", {}).get(p),
                "pid": procs.read_pid(state, p)}
            for p in running
        },
    }
    if cluster.real_node:
        result["realNode"] = cluster.real_node
    if running["kube-apiserver"]:
        ready, total = cluster.nodes_ready()
        result["nodes"] = {"total": total, "ready": ready}
    return result


def real_node_skip_reason(name: str) -> str | None:
    """Why a test session's cluster gets no real node (None: it gets one). EDGEFLEET_REAL_NODE=0 opts out."""
    if os.environ.get("EDGEFLEET_REAL_NODE", "1") == "0":
        return "EDGEFLEET_REAL_NODE=0"
    return node.cannot_run(state_dir(name))
