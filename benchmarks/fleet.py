"""Fleet benchmark: the operator rolling the quickstart out to ~1,000 kwok nodes vs plain DaemonSets.

    python benchmarks/fleet.py [--scale 125] [--timing-runs 10] [--idle 60] [--chaos] [--json PATH]
    python benchmarks/fleet.py --scale 1250 --node-lease-seconds 600 --up-timeout 1800   # 10,000 nodes

One run, one cluster (``bench-fleet``: the default fleet file, ``--scale`` nodes per class, default
1,000 nodes in all: 125 x 8 classes):

1. CRDs (crds/) and the built-in HardwareProfiles are applied; the operator starts as a subprocess
   (``python -m edgefleet.cli operator --liveness ''``) with its own client certificate (user
   ``edgefleet-bench-operator``, signed by the cluster's CA, bound to cluster-admin) so the API server
   can tell its requests apart; the quickstart EdgeModel (+ its ConfigMap) is applied into
   ``bench-edgefleet`` and compiled (reported separately: compile seconds, empty compile cache).
2. Baseline: the same pods as hand-written DaemonSets, one per class that has a Ready variant: rendered
   with ``edgefleet.render.render_class`` from the same profiles and variants (so same image, node
   affinity, tolerations, resources, digests), but with no owner reference and
   ``app.kubernetes.io/managed-by: kubectl-baseline`` (the operator does not watch them), plus the
   Service; applied with ``kubectl apply --server-side`` into ``bench-baseline``. Timed from the apply
   to every expected pod Ready (pods watched, not polled); then deleted and waited until gone.
3. edgefleet: the quickstart EdgeDeployment is applied into ``bench-edgefleet``; timed from the apply
   to every expected pod Ready. Ratio = edgefleet / baseline (goal <= 1.1). Then ``--idle`` seconds of
   steady state: the operator's requests beyond (re)starting its watch streams (goal <= 1 a minute).
4. ``--chaos``: the pod template changes (spec.runtime.threads) once with nothing killed (the reference),
   then again and the operator is SIGKILLed
   ``--chaos-kill-after`` seconds later, the API server is restarted, the operator started again; reported:
   seconds from the change until every DaemonSet rolled out the new template and the EdgeDeployment is
   Available, then duplicates (a second workload per class, a second pod on a node, a second Service) and
   orphans (children not owned by the EdgeDeployment, pods whose DaemonSet is gone, workloads of no class).

The operator process exists (idle) during the baseline too, so both phases run next to the same set of
processes. Also reported: operator peak RSS (VmHWM for the whole run, which includes the inline
compile, and the peak VmRSS sampled every 0.2 s during the rollout; goal <= 150 MB at 1,000 nodes, 400 MB
at 10,000) and the operator's API requests per node (goal <= 0.05 during a rollout), counted by the API
server: FlowSchemas match the operator's user (one per kind of request) and
``apiserver_flowcontrol_dispatched_requests_total{flow_schema=...}`` is read from ``/metrics`` before and
after. Whole-cluster requests (``apiserver_request_total``, every client) are reported per phase for context.
The cluster is always torn down.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from edgefleet.api import EdgeDeployment, HardwareProfile, Variant
from edgefleet.render import render_class, render_service, resolve_nodes
from edgefleet_dev.admin import trust_with_privileged_classes
from edgefleet_dev.devcluster import cluster as dc
from edgefleet_dev.devcluster import procs
from edgefleet_dev.devcluster.fleet import load_fleet
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CRDS = REPO / "crds"
PROFILES = REPO / "operator" / "edgefleet" / "profiles"
QUICKSTART = REPO / "examples" / "quickstart"
OPERATOR_USER = "edgefleet-bench-operator"
NS_BASE, NS_EF = "bench-baseline", "bench-edgefleet"
GOAL_RATIO = 1.1  # apply -> all pods Ready, edgefleet / hand-written DaemonSets
GOAL_REQUESTS_PER_NODE = 0.05  # operator requests per node during a rollout
GOAL_IDLE_PER_MINUTE = 1.0  # operator requests a minute at idle, beyond (re)starting its watch streams


def goal_rss_mb(nodes: int) -> float:
    """Operator peak RSS goal: 150 MB up to 1,000 nodes, 400 MB at 10,000."""
    return 150.0 if nodes <= 1000 else 400.0

# request categories, counted by the API server through one FlowSchema each (first match wins)
CATEGORIES = [
    ("watch", {"verbs": ["watch"], "apiGroups": ["*"], "resources": ["*"]}),
    ("nodes", {"verbs": ["*"], "apiGroups": [""], "resources": ["nodes"]}),
    ("workloads", {"verbs": ["*"], "apiGroups": ["apps"], "resources": ["*"]}),
    ("edgefleet.io", {"verbs": ["*"], "apiGroups": ["edgefleet.io"], "resources": ["*"]}),
    ("events", {"verbs": ["*"], "apiGroups": ["", "events.k8s.io"], "resources": ["events"]}),
    ("services", {"verbs": ["*"], "apiGroups": [""], "resources": ["services"]}),
    ("other", {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- operator identity and request counting


def issue_operator_kubeconfig(cluster: dc.Cluster) -> Path:
    """A client certificate for OPERATOR_USER signed by the cluster CA, and a kubeconfig using it."""
    pki = cluster.state / "pki"
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, OPERATOR_USER)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt, key_path = pki / "bench-operator.crt", pki / "bench-operator.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    kubeconfig = cluster.state / "bench-operator.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "op",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server,
                                               "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "op", "user": {"client-certificate": str(crt), "client-key": str(key_path)}}],
        "contexts": [{"name": "op", "context": {"cluster": "c", "user": "op"}}],
    }))
    kubeconfig.chmod(0o600)
    return kubeconfig


def measurement_objects() -> list[dict]:
    """RBAC for the operator's user and one FlowSchema per request category."""
    objs: list[dict] = [{
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": OPERATOR_USER},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}],
    }]
    for i, (cat, rule) in enumerate(CATEGORIES):
        rules = [{**rule, "clusterScope": True, "namespaces": ["*"]}]
        spec_rule: dict = {"subjects": [{"kind": "User", "user": {"name": OPERATOR_USER}}], "resourceRules": rules}
        if cat == "other":
            spec_rule["nonResourceRules"] = [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
        objs.append({
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
            "metadata": {"name": f"bench-op-{cat.replace('.', '-')}"},
            "spec": {"priorityLevelConfiguration": {"name": "workload-high"}, "matchingPrecedence": 100 + i,
                     "distinguisherMethod": {"type": "ByUser"}, "rules": [spec_rule]},
        })
    return objs


_CATEGORY_OF = {c.replace(".", "-"): c for c, _ in CATEGORIES}
_SAMPLE = re.compile(r"^(apiserver_request_total|apiserver_flowcontrol_dispatched_requests_total)(\{[^}]*\})?\s+(\S+)")


def scrape(cluster: dc.Cluster) -> dict:
    """Operator requests per category (APF) and every client's requests (apiserver_request_total)."""
    text = cluster.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    ops: Counter = Counter()
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "apiserver_flowcontrol_dispatched_requests_total":
            fs = re.search(r'flow_schema="bench-op-([^"]+)"', labels)
            if fs:
                ops[_CATEGORY_OF.get(fs.group(1), fs.group(1))] += value
        elif name == "apiserver_request_total":
            total += value
    return {"operator": dict(ops), "all_clients": total}


def diff(after: dict, before: dict) -> dict:
    ops = {k: after["operator"].get(k, 0) - before["operator"].get(k, 0)
           for k in set(after["operator"]) | set(before["operator"])}
    return {"operator": {k: int(v) for k, v in sorted(ops.items()) if v},
            "operator_total": int(sum(ops.values())), "all_clients": int(after["all_clients"] - before["all_clients"])}


# ---------------------------------------------------------------- watching pods and workloads


class PodWatch:
    """Watches pods (and DaemonSets) in one namespace; records when the expected pods are all Ready."""

    def __init__(self, api: client.ApiClient, namespace: str, expected: int):
        self.core, self.apps = client.CoreV1Api(api), client.AppsV1Api(api)
        self.namespace, self.expected = namespace, expected
        self.pods: dict[str, tuple[bool, bool]] = {}  # name -> (ready, deleting)
        self.lost_ready = 0  # pods that went from Ready to not Ready without being deleted (node trouble)
        self.ds_created: dict[str, float] = {}
        self.t0 = 0.0
        self.first_pod: float | None = None
        self.all_ready: float | None = None
        self.all_gone: float | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def start(self) -> None:
        self.t0 = time.monotonic()
        for target in (self._pods, self._daemonsets):
            threading.Thread(target=self._forever, args=(target,), daemon=True).start()

    def _forever(self, target) -> None:
        while not self.stop.is_set():
            try:
                target()
            except Exception as err:  # noqa: BLE001 - a dropped watch is restarted
                if not self.stop.is_set():
                    log(f"watch restarted: {err}")
                    time.sleep(0.5)

    def _pods(self) -> None:
        listing = self.core.list_namespaced_pod(self.namespace)
        with self.changed:
            self.pods = {p.metadata.name: self._state(p) for p in listing.items}
            self._update()
        w = watch.Watch()
        for ev in w.stream(self.core.list_namespaced_pod, self.namespace,
                           resource_version=listing.metadata.resource_version, timeout_seconds=300):
            if self.stop.is_set():
                w.stop()
                return
            pod = ev["object"]
            with self.changed:
                if ev["type"] == "DELETED":
                    self.pods.pop(pod.metadata.name, None)
                else:
                    if self.first_pod is None and ev["type"] == "ADDED":
                        self.first_pod = time.monotonic() - self.t0
                    state = self._state(pod)
                    if self.pods.get(pod.metadata.name, (False, False))[0] and not state[0] and not state[1]:
                        self.lost_ready += 1
                    self.pods[pod.metadata.name] = state
                self._update()

    def _daemonsets(self) -> None:
        w = watch.Watch()
        for ev in w.stream(self.apps.list_namespaced_daemon_set, self.namespace, timeout_seconds=300):
            if self.stop.is_set():
                w.stop()
                return
            name = ev["object"].metadata.name
            if ev["type"] != "DELETED" and name not in self.ds_created:
                self.ds_created[name] = time.monotonic() - self.t0

    @staticmethod
    def _state(pod) -> tuple[bool, bool]:
        ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
        return ready, pod.metadata.deletion_timestamp is not None

    def _update(self) -> None:
        now = time.monotonic() - self.t0
        ready = sum(1 for r, d in self.pods.values() if r and not d)
        if self.all_ready is None and ready >= self.expected:
            self.all_ready = now
        if self.all_ready is not None and self.all_gone is None and not self.pods and self.gone_wanted:
            self.all_gone = now
        self.changed.notify_all()

    gone_wanted = False

    def ready_count(self) -> int:
        return sum(1 for r, d in self.pods.values() if r and not d)

    def wait(self, what: str, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        with self.changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what}: {self.ready_count()}/{self.expected} pods Ready, "
                                       f"{len(self.pods)} pods after {timeout:.0f}s")
                self.changed.wait(min(left, 2.0))
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    log(f"  {what}: {self.ready_count()}/{self.expected} Ready, {len(self.pods)} pods")


# ---------------------------------------------------------------- the operator process


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop, self.peak_kb, self.window_peak_kb = pid, threading.Event(), 0, 0

    def status(self) -> dict[str, int]:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return {}
        return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in text.splitlines())
                if k in ("VmRSS", "VmHWM")}

    def run(self) -> None:
        while not self.stop.is_set():
            rss = self.status().get("VmRSS", 0)
            self.peak_kb = max(self.peak_kb, rss)
            self.window_peak_kb = max(self.window_peak_kb, rss)
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the operator has used so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def window(self) -> int:
        """Peak VmRSS since the last call, then reset."""
        peak, self.window_peak_kb = self.window_peak_kb, self.status().get("VmRSS", 0)
        return peak


def start_operator(cluster: dc.Cluster, kubeconfig: Path, workdir: Path, timing_runs: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "EDGEFLEET_ARTIFACT_STORE": f"oci://{cluster.registry}/bench",
        "EDGEFLEET_ARTIFACT_INSECURE": "true",
        "EDGEFLEET_COMPILE_CACHE": str(workdir / "compile-cache"),
        "EDGEFLEET_COMPILE_TIMING_RUNS": str(timing_runs),
    }
    logfile = (workdir / "operator.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "operator", "--liveness", ""], env=env,
                            stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- objects


def quickstart_docs(cluster: dc.Cluster) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(QUICKSTART)).stdout) if d]
    docs = [d for d in docs if d["kind"] != "Namespace"]
    for d in docs:
        d["metadata"]["namespace"] = NS_EF
    return docs


def apply(cluster: dc.Cluster, docs: list[dict], timeout: float = 300) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}), timeout=timeout)


def _relabel(obj):
    """managed-by=kubectl-baseline everywhere (labels, selector, template) so the operator ignores it."""
    if isinstance(obj, dict):
        return {k: ("kubectl-baseline" if k == "app.kubernetes.io/managed-by" else _relabel(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relabel(v) for v in obj]
    return obj


def baseline_manifests(ed_doc: dict, profiles: list[HardwareProfile], variants: dict[str, dict],
                       classes: list[str]) -> list[dict]:
    """The DaemonSets (and Service) a user would write by hand for the same pods."""
    doc = json.loads(json.dumps(ed_doc))
    doc["metadata"].update({"namespace": NS_BASE, "uid": "00000000-0000-0000-0000-000000000000"})
    ed = EdgeDeployment.model_validate(doc)
    by_name = {p.metadata["name"]: p for p in profiles}
    out = []
    for cls in classes:
        v = Variant.model_validate(variants[cls])
        out.append(render_class(ed, by_name[cls], v, profiles, "/var/lib/edgefleet/cache", None, True))
    out.append(render_service(ed))
    for o in out:
        o["metadata"].pop("ownerReferences", None)
    return [_relabel(o) for o in out]


def ready_variants(cluster: dc.Cluster) -> dict[str, dict] | None:
    em = json.loads(cluster.kubectl("get", "edgemodel", "digits", "-n", NS_EF, "-o", "json").stdout)
    status = em.get("status") or {}
    variants = status.get("variants") or []
    if status.get("observedGeneration") != em["metadata"]["generation"] or not variants:
        return None
    if any(v.get("state") not in ("Ready", "Failed") for v in variants):
        return None
    return {v["profile"]: v for v in variants if v.get("state") == "Ready"}


def wait_until(what: str, check, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(dc.ClusterError, KeyError, ValueError):
            result = check()
            if result:
                return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def ed_available(cluster: dc.Cluster) -> bool:
    ed = json.loads(cluster.kubectl("get", "edgedeployment", "digits", "-n", NS_EF, "-o", "json").stdout)
    st = ed.get("status") or {}
    return st.get("observedGeneration") == ed["metadata"]["generation"] and any(
        c["type"] == "Available" and c["status"] == "True" for c in st.get("conditions", []))


# ---------------------------------------------------------------- chaos: operator killed, API server restarted


def restart_apiserver(cluster: dc.Cluster, timeout: float) -> float:
    """Stop the cluster's kube-apiserver and start it with the same arguments; seconds until /readyz answers.
    (The devcluster has no public restart: its own start/stop helpers are used, as `up` uses them.)"""
    state, ports = cluster.state, json.loads((cluster.state / "cluster.json").read_text())["ports"]
    t = time.monotonic()
    procs.stop(state, "kube-apiserver")
    procs.start(state, "kube-apiserver", dc._args(state, ports)["kube-apiserver"])
    procs.wait("kube-apiserver /readyz", lambda: dc._https_ok(f"{cluster.server}/readyz", state), timeout, state,
             "kube-apiserver")
    return time.monotonic() - t


def relax_node_leases(lease_seconds: int) -> None:
    """Make the devcluster start kwok with `lease_seconds` node leases (renewed every quarter of one) and the
    controller manager with a node grace period of three leases: at 10,000 nodes the default 40 s leases are
    ~1,000 lease writes a second, which a 2-core machine cannot sustain (nodes go NotReady, pods lose Ready).
    (The devcluster has no such option: its argument builder is wrapped for this process.)"""
    build = dc._args

    def args(state: Path, ports: dict[str, int]) -> dict[str, list[str]]:
        out = build(state, ports)
        out["kwok"] = [a for a in out["kwok"] if not a.startswith("--node-lease-duration-seconds=")]
        out["kwok"].append(f"--node-lease-duration-seconds={lease_seconds}")
        out["kube-controller-manager"].append(f"--node-monitor-grace-period={3 * lease_seconds}s")
        return out

    dc._args = args


def children(cluster: dc.Cluster) -> dict:
    """Our workloads, Services and pods in the edgefleet namespace, and the EdgeDeployment."""
    get = lambda what: json.loads(cluster.kubectl(  # noqa: E731
        "get", what, "-n", NS_EF, "-l", "app.kubernetes.io/managed-by=edgefleet", "-o", "json", timeout=120).stdout
                                  )["items"]
    ed = json.loads(cluster.kubectl("get", "edgedeployment", "digits", "-n", NS_EF, "-o", "json").stdout)
    return {"ed": ed, "daemonsets": get("daemonsets"), "deployments": get("deployments"),
            "services": get("services"), "pods": get("pods")}


def converged(cluster: dc.Cluster, generations: dict[str, int]) -> bool:
    """Every DaemonSet has a newer template than before the change, rolled out and Ready; status says so."""
    world = children(cluster)
    ds = world["daemonsets"]
    if {d["metadata"]["name"] for d in ds} != set(generations):
        return False
    for d in ds:
        st = d.get("status", {})
        if d["metadata"]["generation"] <= generations[d["metadata"]["name"]] or st.get(
                "observedGeneration") != d["metadata"]["generation"]:
            return False
        if not st.get("desiredNumberScheduled", 0) == st.get("updatedNumberScheduled") == st.get("numberReady"):
            return False
    return ed_available(cluster)


def audit(cluster: dc.Cluster, classes: list[str]) -> dict:
    """Duplicates (a second workload for a class, a second pod on a node) and orphans (children without the
    EdgeDeployment as owner, workloads of no served class, pods whose DaemonSet is gone, Services too many)."""
    world = children(cluster)
    uid = world["ed"]["metadata"]["uid"]
    owned = lambda o: any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))  # noqa: E731
    workloads = world["daemonsets"] + world["deployments"]
    per_class = Counter(o["metadata"]["labels"].get("edgefleet.io/profile") for o in workloads)
    per_node = Counter(p["spec"].get("nodeName") for p in world["pods"] if not p["metadata"].get("deletionTimestamp"))
    ds_uids = {d["metadata"]["uid"] for d in world["daemonsets"]}
    return {
        "duplicate_workloads": sum(n - 1 for n in per_class.values() if n > 1),
        "duplicate_pods_on_a_node": sum(n - 1 for node, n in per_node.items() if node and n > 1),
        "duplicate_services": max(0, len(world["services"]) - 1),
        "orphan_children": sum(1 for o in workloads + world["services"] if not owned(o)),
        "workloads_of_no_served_class": sum(1 for c in per_class if c not in classes),
        "orphan_pods": sum(1 for p in world["pods"] if not any(
            r.get("uid") in ds_uids for r in p["metadata"].get("ownerReferences", []))),
        "pods": len(world["pods"]), "workloads": len(workloads),
    }


def chaos(cluster: dc.Cluster, op: subprocess.Popen, kubeconfig: Path, workdir: Path, args, expected: int):
    """A rollout (runtime.threads changes every pod template) during which the operator is killed (SIGKILL)
    and the API server restarted, then the operator started again; time from the change to converged."""
    log("chaos: the reference, a pod-template change with nothing killed")
    before, t0 = change_template(cluster)
    wait_until("the reference rollout to converge", lambda: converged(cluster, before), args.timeout, 1.0)
    reference = time.monotonic() - t0
    log(f"chaos: reference converged in {reference:.1f}s; changing the pod template again, killing the operator "
        f"after {args.chaos_kill_after:.0f}s, restarting the API server")
    before, t0 = change_template(cluster)
    time.sleep(args.chaos_kill_after)
    op.kill()
    op.wait(30)
    killed = time.monotonic() - t0
    restart_s = restart_apiserver(cluster, args.timeout)
    op = start_operator(cluster, kubeconfig, workdir, args.timing_runs)
    sampler = RssSampler(op.pid)
    sampler.start()
    restarted = time.monotonic() - t0
    wait_until("the rollout to converge after the chaos", lambda: converged(cluster, before), args.timeout, 1.0)
    result = {"reference_change_to_converged_s": reference, "operator_killed_at_s": killed,
              "apiserver_restart_s": restart_s, "operator_restarted_at_s": restarted,
              "change_to_converged_s": time.monotonic() - t0, "expected_pods": expected}
    time.sleep(5)  # anything the restarted operator would still do
    result.update(audit(cluster, [name.removeprefix("digits-") for name in before]))
    result["rss_peak_mb"] = sampler.window() / 1024
    log(f"chaos: converged {result['change_to_converged_s']:.1f}s after the change; "
        f"duplicates/orphans {result}")
    return op, sampler, result


def change_template(cluster: dc.Cluster) -> tuple[dict[str, int], float]:
    """Bump spec.runtime.threads (every pod template changes); the DaemonSets' generations before, and when."""
    world = children(cluster)
    before = {d["metadata"]["name"]: d["metadata"]["generation"] for d in world["daemonsets"]}
    threads = world["ed"]["spec"].get("runtime", {}).get("threads", 1) + 1
    t0 = time.monotonic()
    cluster.kubectl("patch", "edgedeployment", "digits", "-n", NS_EF, "--type", "merge",
                    "-p", json.dumps({"spec": {"runtime": {"threads": threads}}}))
    return before, t0


# ---------------------------------------------------------------- the run


def run(args) -> dict:
    name = args.name
    dc.down(name, echo=lambda _m: None)
    if args.node_lease_seconds:
        log(f"node leases of {args.node_lease_seconds}s (kwok), grace {3 * args.node_lease_seconds}s (controller)")
        relax_node_leases(args.node_lease_seconds)
    t = time.monotonic()
    cluster = dc.up(name, scale=args.scale, echo=log, timeout=args.up_timeout)
    result: dict = {"cluster_up_seconds": time.monotonic() - t, "node_lease_seconds": args.node_lease_seconds}
    op = sampler = None
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-fleet-bench-"))
    try:
        log("applying CRDs, profiles, RBAC and FlowSchemas")
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        *[f"crd/{p.name.removesuffix('.yaml')}" for p in CRDS.glob("*.yaml")])
        wait_until("the HardwareProfile kind", lambda: cluster.kubectl("get", "hwp", check=False).returncode == 0,
                   60, 0.5)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PROFILES))
        apply(cluster, measurement_objects())
        for ns in (NS_BASE, NS_EF):
            cluster.kubectl("create", "namespace", ns)
        wait_until("default service accounts", lambda: all(
            cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0 for ns in (NS_BASE, NS_EF)),
            60, 0.5)
        # as the fleet's admin: the Coral boxes' privileged class serves only namespaces it lists (else the
        # EdgeDeployment is Degraded ClassNotAllowed and never Available)
        trust_with_privileged_classes(cluster, NS_EF)

        nodes = {n["metadata"]["name"]: n["metadata"].get("labels", {})
                 for n in json.loads(cluster.kubectl("get", "nodes", "-o", "json", timeout=120).stdout)["items"]}
        profiles = [HardwareProfile.model_validate(p) for p in
                    json.loads(cluster.kubectl("get", "hardwareprofiles", "-o", "json").stdout)["items"]]
        placement = resolve_nodes(nodes, profiles)
        result["nodes"] = len(nodes)
        result["nodes_per_class"] = dict(Counter(p or "(no profile)" for p in placement.values()))

        kubeconfig = issue_operator_kubeconfig(cluster)
        m0 = scrape(cluster)
        log("starting the operator")
        op = start_operator(cluster, kubeconfig, workdir, args.timing_runs)
        sampler = RssSampler(op.pid)
        sampler.start()
        docs = quickstart_docs(cluster)
        ed_doc = next(d for d in docs if d["kind"] == "EdgeDeployment")
        time.sleep(5)  # let it start and list the world (counted in "startup")
        m1 = scrape(cluster)
        result["rss_after_startup_mb"] = sampler.window() / 1024
        log("applying the EdgeModel: compiling")
        t = time.monotonic()
        apply(cluster, [d for d in docs if d["kind"] != "EdgeDeployment"])
        variants = wait_until("the EdgeModel's variants", lambda: ready_variants(cluster), args.timeout)
        result["compile_seconds"] = time.monotonic() - t
        result["rss_peak_compile_mb"] = sampler.window() / 1024
        classes = sorted(c for c in set(placement.values()) if c in variants)
        expected = sum(1 for p in placement.values() if p in variants)
        result.update({"variants_ready": sorted(variants), "classes_served": classes, "expected_pods": expected})
        log(f"compiled {sorted(variants)} in {result['compile_seconds']:.0f}s; {expected} pods expected over "
            f"{len(classes)} classes")
        if args.fresh_operator:  # isolate the rollout's memory from the inline compile's
            result["compile_operator_vmhwm_mb"] = sampler.status().get("VmHWM", 0) / 1024
            sampler.stop.set()
            op.terminate()
            op.wait(30)
            log("restarting the operator (variants are in status: no recompile)")
            op = start_operator(cluster, kubeconfig, workdir, args.timing_runs)
            sampler = RssSampler(op.pid)
            sampler.start()
            time.sleep(5)
            result["rss_after_restart_mb"] = sampler.window() / 1024
        time.sleep(3)
        m2 = scrape(cluster)

        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        # (a) baseline
        manifests = baseline_manifests(ed_doc, profiles, variants, classes)
        w = PodWatch(api, NS_BASE, expected)
        w.start()
        time.sleep(1)  # watches established
        log("baseline: kubectl apply of the hand-written DaemonSets")
        w.t0, cpu = time.monotonic(), sampler.cpu_seconds()
        apply(cluster, manifests)
        w.wait("baseline pods Ready", lambda: w.all_ready is not None, args.timeout)
        m3 = scrape(cluster)
        base = {"apply_to_all_ready_s": w.all_ready, "first_pod_s": w.first_pod,
                "operator_cpu_s": sampler.cpu_seconds() - cpu,
                "last_daemonset_created_s": max(w.ds_created.values(), default=None),
                "requests": diff(m3, m2), "pods_lost_ready": w.lost_ready}
        log(f"baseline: {expected} pods Ready in {w.all_ready:.1f}s; deleting")
        t = time.monotonic()
        w.gone_wanted = True
        cluster.kubectl("delete", "daemonsets,services", "--all", "-n", NS_BASE, "--wait=false")
        w.wait("baseline pods gone", lambda: w.all_gone is not None or not w.pods, args.timeout)
        base["delete_to_gone_s"] = time.monotonic() - t
        w.stop.set()
        result["baseline"] = base
        time.sleep(3)

        # (b) edgefleet
        m4 = scrape(cluster)
        sampler.window()
        w = PodWatch(api, NS_EF, expected)
        w.start()
        time.sleep(1)
        log("edgefleet: applying the EdgeDeployment")
        w.t0, cpu = time.monotonic(), sampler.cpu_seconds()
        apply(cluster, [ed_doc])
        w.wait("edgefleet pods Ready", lambda: w.all_ready is not None, args.timeout)
        m5 = scrape(cluster)
        ef = {"apply_to_all_ready_s": w.all_ready, "first_pod_s": w.first_pod,
              "operator_cpu_s": sampler.cpu_seconds() - cpu,
              "last_daemonset_created_s": max(w.ds_created.values(), default=None),
              "first_daemonset_created_s": min(w.ds_created.values(), default=None),
              "requests_until_ready": diff(m5, m4)}
        wait_until("EdgeDeployment Available", lambda: ed_available(cluster), args.timeout, 0.5)
        ef["apply_to_status_available_s"] = time.monotonic() - w.t0
        time.sleep(5)
        m6 = scrape(cluster)
        ef["requests_until_status_settled"] = diff(m6, m4)
        ef["rss_peak_rollout_mb"] = sampler.window() / 1024
        ef["pods_lost_ready"] = w.lost_ready
        w.stop.set()
        result["edgefleet"] = ef
        if args.idle:
            log(f"idle for {args.idle:.0f}s (steady state, resync included)")
            time.sleep(args.idle)
            m7 = scrape(cluster)
            result["idle"] = {"seconds": args.idle, "requests": diff(m7, m6),
                              "rss_peak_mb": sampler.window() / 1024}
        if args.chaos:
            result["operator_vmhwm_before_chaos_mb"] = sampler.status().get("VmHWM", 0) / 1024
            sampler.stop.set()
            op, sampler, result["chaos"] = chaos(cluster, op, kubeconfig, workdir, args, expected)
        result["operator_requests_startup"] = diff(m1, m0)
        result["operator_requests_compile"] = diff(m2, m1)
        result["operator_vmhwm_mb"] = max(sampler.status().get("VmHWM", 0) / 1024,
                                          result.get("operator_vmhwm_before_chaos_mb", 0))
        result["operator_rss_end_mb"] = sampler.status().get("VmRSS", 0) / 1024
        result["ratio"] = ef["apply_to_all_ready_s"] / base["apply_to_all_ready_s"]
        result["operator_log_tail"] = (workdir / "operator.log").read_text(errors="replace").splitlines()[-40:]
        return result
    finally:
        if sampler:
            sampler.stop.set()
        if op and op.poll() is None:
            op.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                op.wait(20)
            if op.poll() is None:
                op.kill()
        if args.keep:
            log(f"keeping cluster {name!r}; operator log in {workdir}")
        else:
            dc.down(name, echo=log)


def _table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [head, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) for r in lines)


def report(r: dict) -> None:
    n = r["nodes"]
    b, e = r["baseline"], r["edgefleet"]

    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    print(f"\n{n} kwok nodes, {r['expected_pods']} pods over {len(r['classes_served'])} classes "
          f"({', '.join(r['classes_served'])}); compile (inline, empty cache): {r['compile_seconds']:.0f}s\n")
    reqs_b, reqs_e = b["requests"], e["requests_until_ready"]
    print(_table(
        ["run", "apply->all Ready s", "ratio", "last DS created s", "first pod s", "operator reqs", "reqs/node",
         "all-client reqs/node"],
        [["baseline: kubectl DaemonSets", f(b["apply_to_all_ready_s"]), "1.00", f(b["last_daemonset_created_s"]),
          f(b["first_pod_s"]), "-", "-", f(reqs_b["all_clients"] / n, "{:.2f}")],
         ["edgefleet operator", f(e["apply_to_all_ready_s"]), f"{r['ratio']:.2f}", f(e["last_daemonset_created_s"]),
          f(e["first_pod_s"]), reqs_e["operator_total"], f(reqs_e["operator_total"] / n, "{:.3f}"),
          f(reqs_e["all_clients"] / n, "{:.2f}")]]))
    verdict = "ok" if r["ratio"] <= GOAL_RATIO else f"MISSED by {r['ratio'] - GOAL_RATIO:.2f}"
    rss, goal_rss = r["operator_vmhwm_mb"], goal_rss_mb(n)
    print(f"\nratio edgefleet/baseline: {r['ratio']:.2f} (goal <= {GOAL_RATIO}: {verdict})")
    print(f"EdgeDeployment status Available after {e['apply_to_status_available_s']:.1f}s")
    print(f"operator CPU until all pods Ready (2 cores shared with the control plane): baseline "
          f"{f(b.get('operator_cpu_s'))} s, edgefleet {f(e.get('operator_cpu_s'))} s")
    print(f"operator RSS: VmHWM {rss:.0f} MB over the whole run (goal <= {goal_rss:.0f}: "
          f"{'ok' if rss <= goal_rss else f'MISSED by {rss - goal_rss:.0f} MB'}); after start-up (5 s, "
          f"idle) {r['rss_after_startup_mb']:.0f} MB, peak during compile "
          f"{r['rss_peak_compile_mb']:.0f} MB, during rollout {e['rss_peak_rollout_mb']:.0f} MB, end "
          f"{r['operator_rss_end_mb']:.0f} MB")
    if "operator_vmhwm_before_chaos_mb" in r:
        print(f"  of which the first operator (start-up, compile, rollout, idle): VmHWM "
              f"{r['operator_vmhwm_before_chaos_mb']:.0f} MB; the one started during the chaos peaked at "
              f"{r['chaos']['rss_peak_mb']:.0f} MB")
    if "compile_operator_vmhwm_mb" in r:
        print(f"--fresh-operator: the compiling operator peaked at {r['compile_operator_vmhwm_mb']:.0f} MB; the "
              f"restarted one (no compile) used {r['rss_after_restart_mb']:.0f} MB after start-up and peaked at "
              f"{r['operator_vmhwm_mb']:.0f} MB (VmHWM) through rollout and idle")
    settled = e["requests_until_status_settled"]
    rows = [["startup (5 s)", r["operator_requests_startup"]], ["compile", r["operator_requests_compile"]],
            ["rollout until pods Ready", reqs_e], ["rollout until status settled (+5 s)", settled]]
    if "idle" in r:
        rows.append([f"idle {r['idle']['seconds']:.0f}s", r["idle"]["requests"]])
    cats = [c for c, _ in CATEGORIES]
    print("\noperator API requests, counted by the API server (APF FlowSchemas on the operator's user)")
    print(_table(["phase", "total", "per node", *cats],
                 [[ph, d["operator_total"], f"{d['operator_total'] / n:.3f}", *[d["operator"].get(c, 0) for c in cats]]
                  for ph, d in rows]))
    per_node = settled["operator_total"] / n
    print(f"\noperator requests per node, rollout until status settled: {per_node:.3f} (goal <= "
          f"{GOAL_REQUESTS_PER_NODE}: {_verdict(per_node, GOAL_REQUESTS_PER_NODE)})")
    if "idle" in r:
        idle = r["idle"]["requests"]
        per_minute = (idle["operator_total"] - idle["operator"].get("watch", 0)) * 60 / r["idle"]["seconds"]
        print(f"operator requests a minute at idle, beyond its watch streams: {per_minute:.1f} (goal <= "
              f"{GOAL_IDLE_PER_MINUTE}: {_verdict(per_minute, GOAL_IDLE_PER_MINUTE)})")
    print(f"pods that lost Ready without being deleted (node trouble under load): baseline "
          f"{b.get('pods_lost_ready', '-')}, edgefleet {e.get('pods_lost_ready', '-')}")
    if "chaos" in r:
        c = r["chaos"]
        print("\nchaos: a pod-template change; the operator SIGKILLed, the API server restarted, the operator started")
        print(_table(["reference change->converged s", "killed at s", "API server restart s", "operator back at s",
                      "change->converged s",
                      "dup workloads", "dup pods/node", "dup Services", "orphan children", "orphan pods",
                      "no-class workloads"],
                     [[f(c.get("reference_change_to_converged_s")), f(c["operator_killed_at_s"]),
                       f(c["apiserver_restart_s"]), f(c["operator_restarted_at_s"]),
                       f(c["change_to_converged_s"]), c["duplicate_workloads"], c["duplicate_pods_on_a_node"],
                       c["duplicate_services"], c["orphan_children"], c["orphan_pods"],
                       c["workloads_of_no_served_class"]]]))


def _verdict(value: float, goal: float) -> str:
    return "ok" if value <= goal else f"MISSED by {value - goal:.3g}"


def _pytest_running() -> bool:
    return subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, check=False).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=None,
                    help="nodes per fleet class (default: 1,000 nodes over the default fleet's classes)")
    ap.add_argument("--name", default="bench-fleet")
    ap.add_argument("--timing-runs", type=int, default=10, help="EDGEFLEET_COMPILE_TIMING_RUNS for the compile")
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of steady state to count requests over")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--fresh-operator", action="store_true",
                    help="restart the operator after the compile, so its RSS during the rollout excludes the compile")
    ap.add_argument("--chaos", action="store_true",
                    help="after idle: a rollout during which the operator is killed and the API server restarted")
    ap.add_argument("--chaos-kill-after", type=float, default=2.0, help="seconds after the change to kill it")
    ap.add_argument("--node-lease-seconds", type=int, default=None,
                    help="start kwok with longer node leases (and the controller manager with 3x the grace): "
                         "for 10,000 nodes on a small machine")
    ap.add_argument("--up-timeout", type=float, default=600.0, help="seconds for the cluster and its nodes to come up")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running (debugging)")
    ap.add_argument("--json", type=Path, default=RESULTS / "fleet.json")
    args = ap.parse_args()
    if not args.name.startswith("bench-"):
        sys.exit("cluster names must start with bench-")
    if args.scale is None:
        args.scale = round(1000 / len(load_fleet().classes))
    load_before = {"loadavg": os.getloadavg(), "pytest_running": _pytest_running()}
    r = run(args)
    r["load"] = {"before": load_before, "after": {"loadavg": os.getloadavg(), "pytest_running": _pytest_running()}}
    r["machine"] = {"host": platform.node(), "cpus": os.cpu_count()}
    report(r)
    print(f"load: before {r['load']['before']}, after {r['load']['after']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2, default=str))
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
