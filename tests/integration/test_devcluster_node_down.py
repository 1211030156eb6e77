"""`edgefleet cluster down` leaves nothing of a real node behind: processes, mounts, network namespaces,
the bridge, iptables rules, cgroups and files outside the state directory are as they were before `up`.

It needs this machine's real node for itself (one per machine), so it starts its own small cluster and
skips, naming the holder, while another cluster's real node runs."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from edgefleet_dev import toolchain as components
from edgefleet_dev.devcluster import cluster as dc
from edgefleet_dev.devcluster import node, procs
from kube_helpers import apply, get, is_ready, wait_for
from test_devcluster_node import build_echo_image, echo_pod

pytestmark = pytest.mark.cluster


def _lines(*cmd: str) -> list[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout.splitlines() if proc.returncode == 0 else [f"<{cmd[0]} failed: {proc.stderr.strip()}>"]


def _rules(tool: str) -> list[str]:
    """iptables-save without comments and counters."""
    return [re.sub(r" \[\d+:\d+\]$", "", line) for line in _lines(tool) if not line.startswith("#")]


def _listing(folder: str) -> list[str]:
    root = Path(folder)
    return sorted(str(p) for p in root.rglob("*")) if root.exists() else []


def _node_processes() -> list[str]:
    """Processes of a real node: its daemons, shims and the pods' processes (in its cgroups)."""
    bindir, clusters, found = str(components.cache_dir() / "bin"), str(dc.state_dir("x").parent), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            exe, cgroups = os.readlink(proc / "exe"), (proc / "cgroup").read_text()
        except OSError:
            continue
        daemon = exe.startswith(bindir) and any(d in exe for d in ("containerd", "kubelet", "kube-proxy"))
        if daemon or exe.startswith(clusters) or f":/{node.CGROUP_ROOT}/" in cgroups:  # a pod's process
            found.append(f"{proc.name} {exe}")
    return sorted(found)


def host_snapshot() -> dict:
    return {
        "iptables": _rules("iptables-save"),
        "ip6tables": _rules("ip6tables-save"),
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in _lines("ip", "-o", "link")),
        "routes": _lines("ip", "route"),
        "netns": _listing("/var/run/netns"),
        "mounts": sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()),
        "cgroups": sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{node.CGROUP_ROOT}")),
        "processes": _node_processes(),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
        "files": _listing("/var/log/containers") + _listing("/var/lib/cni") + _listing("/run/containerd")
        + _listing("/run/edgefleet"),
    }


def _diff(before: dict, after: dict) -> str:
    out = []
    for key in before:
        b, a = before[key], after[key]
        if b != a:
            if isinstance(b, list):
                out.append(f"{key}: added {sorted(set(a) - set(b))}, removed {sorted(set(b) - set(a))}")
            else:
                out.append(f"{key}: {b!r} -> {a!r}")
    return "\n".join(out)


def leftovers(snap: dict) -> list[str]:
    """What of a real node is visible in a host snapshot."""
    found = [f"link {node.BRIDGE}"] if node.BRIDGE in snap["links"] else []
    found += [f"{t}: {r}" for t in ("iptables", "ip6tables") for r in snap[t]
              if any(k in r for k in ("KUBE-", "EDGEFLEET", "CNI-", node.BRIDGE))]
    found += [f"mount {m}" for m in snap["mounts"] if "/clusters/" in m]
    found += [f"route {r}" for r in snap["routes"] if "blackhole" in r or node.BRIDGE in r]
    found += [f"netns {n}" for n in snap["netns"] if "/cni-" in n]
    found += [f"file {f}" for f in snap["files"] if "edgefleet" in f or f.startswith("/var/log/containers/")]
    return found + [f"cgroup {c}" for c in snap["cgroups"]] + [f"process {p}" for p in snap["processes"]]


def run_a_pod_and_a_service(cluster, tmp_path) -> dict:
    ns = f"leak-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
             what="the default ServiceAccount")
    pod = echo_pod("echo", build_echo_image(cluster, tmp_path), cluster.real_node["name"])
    pod["spec"]["containers"][0]["ports"][0]["hostPort"] = 18080  # the portmap plugin's chains too
    apply(cluster, ns, [
        pod,
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
         "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ])
    wait_for(lambda: is_ready(get(cluster, ns, "pod", "echo")), timeout=120, what="the echo pod Ready")
    assert urllib.request.urlopen(f"http://{node.NODE_IP}:18080/", timeout=5).read() == b"hello from echo\n"
    running = host_snapshot()
    assert node.BRIDGE in running["links"] and any("KUBE-SERVICES" in r for r in running["iptables"])
    assert any("CNI-HOSTPORT-DNAT" in r for r in running["iptables"])
    assert any(r.startswith("blackhole 10.244.0.0/16") for r in running["routes"])  # kwok's fake pod IPs
    assert any("/node/" in m for m in running["mounts"]) and running["processes"] and running["cgroups"]
    return running


def test_down_leaves_nothing_behind(tmp_path):
    """Own small cluster: host state after `down` equals host state before `up`."""
    reason = node.cannot_run()
    if reason:
        pytest.skip(f"no real node for this test: {reason}")
    name = f"leak-{uuid.uuid4().hex[:6]}"
    before = host_snapshot()
    try:
        cluster = dc.up(name, scale=0, real_node=True, echo=lambda _: None)
        run_a_pod_and_a_service(cluster, tmp_path)
    finally:
        dc.down(name, echo=lambda _: None)
    after = host_snapshot()
    assert not leftovers(after), leftovers(after)
    assert after == before, "left behind after down:\n" + _diff(before, after)
    assert not dc.state_dir(name).exists()


def test_stopping_the_real_node_leaves_nothing_behind(cluster, tmp_path):
    """The session's own cluster: stop its real node, start it again, run a pod, stop it: nothing left, host
    state as after the first stop. Then the node starts again for the tests after this one."""
    name = cluster.state.name
    if cluster.real_node is None or name not in procs.started_here:
        pytest.skip(f"cluster {name!r} has no real node this session started (it may serve other sessions)")
    dc.stop_real_node(name, echo=lambda _: None)
    try:
        before = host_snapshot()
        assert not leftovers(before), leftovers(before)
        dc.up(name, real_node=True, echo=lambda _: None)
        run_a_pod_and_a_service(cluster, tmp_path)
        dc.stop_real_node(name, echo=lambda _: None)
        after = host_snapshot()
        assert not leftovers(after), leftovers(after)
        assert after == before, "left behind by stopping the real node:\n" + _diff(before, after)
    finally:
        if cluster.real_node is None:
            dc.up(name, real_node=True, echo=lambda _: None)
