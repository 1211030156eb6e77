"""`edgefleet demo`: the whole story on this machine, end to end.

Local cluster -> `helm install` the chart -> the operator -> `kubectl apply -k examples/quickstart/` ->
wait until every class is served -> run the runtime for this machine's class on its variant -> send
real inference requests -> one table per hardware class.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import click
import numpy as np
from edgefleet.api import HardwareProfile, label_selector_matches
from edgefleet.progress import Progress
from edgefleet.render import resolve_nodes

from . import stack
from .admin import trust_with_privileged_classes
from .devcluster import cluster as dc

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
CHART = REPO / "charts" / "edgefleet"
NAMESPACE = "edgefleet-demo"
DEMO_CLUSTER = "default"  # the tests never reuse it unless EDGEFLEET_CLUSTER names it
REAL_NODE_TAINT = "edgefleet.io/real-node"  # the dev cluster's real node (devcluster/node.py) carries it
REAL_NODE_TOLERATION = {"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}


class DemoError(RuntimeError):
    pass


def _wait(what: str, check, timeout: float, echo, every: float = 1.0):
    """Poll check() -> (result, note) until it gives a result: a live line with the note and the time used out
    of ``timeout`` on a terminal, else a plain line whenever the note changes."""
    started = time.monotonic()
    result, note = check()
    with Progress(echo) as progress:
        task = progress.add(f"  {what}", total=timeout, status=note)
        while not result and time.monotonic() - started < timeout:
            time.sleep(every)
            result, note = check()
            progress.update(task, time.monotonic() - started, note)
        progress.done(task, note)
    if result:
        return result
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what} (last: {note})")


def _get(cluster, *args) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def install_chart(cluster, echo) -> None:
    echo("installing the edgefleet chart with helm (CRDs, RBAC, the operator Deployment)")
    cluster.helm("upgrade", "--install", "edgefleet", str(CHART), "--namespace", "edgefleet-system",
                 "--create-namespace", "--set", f"artifactStore.url=oci://{cluster.registry}/edgefleet",
                 "--set", "artifactStore.insecure=true", "--wait=false")


def start_operator(cluster, log: Path, echo) -> subprocess.Popen:
    """kwok runs no containers, so the chart's operator pod is only scheduled; the real operator runs here,
    with the chart's settings (it applies the built-in HardwareProfiles at start-up)."""
    env = {**cluster.env(), "EDGEFLEET_ARTIFACT_STORE": f"oci://{cluster.registry}/edgefleet",
           "EDGEFLEET_ARTIFACT_INSECURE": "true", "EDGEFLEET_BUILTIN_PROFILES": "true"}
    echo(f"starting the operator on this machine (log: {log})")
    with log.open("ab") as out:
        operator = subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "operator", "--liveness", ""],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)

    def profiles():
        if operator.poll() is not None:
            raise DemoError(f"the operator exited ({operator.returncode}); see {log}")
        found = cluster.kubectl("get", "hardwareprofiles", "-o", "name", check=False).stdout.split()
        return len(found) >= 6, f"{len(found)} HardwareProfiles"

    try:
        _wait("built-in profiles", profiles, 90, echo)
    except BaseException:
        _stop(operator)
        raise
    return operator


def wait_served(cluster, echo, timeout: float) -> tuple[dict, dict]:
    def compiled():
        em = _get(cluster, "edgemodel", "digits", "-n", NAMESPACE)
        variants = em.get("status", {}).get("variants", [])
        done = [v for v in variants if v.get("state") in ("Ready", "Failed")]
        ok = bool(variants) and len(done) == len(variants) and em["status"].get(
            "observedGeneration") == em["metadata"]["generation"]
        return (em if ok else None), f"{len(done)}/{len(variants)} variants compiled"

    em = _wait("compiling", compiled, timeout, echo)

    def available():
        ed = _get(cluster, "edgedeployment", "digits", "-n", NAMESPACE)
        st = ed.get("status", {})
        cond = next((c for c in st.get("conditions", []) if c["type"] == "Available"), {})
        stuck = "; ".join(f"{c['profile']}: {c['message']}" for c in st.get("classes", []) if c.get("message"))
        note = f"pods ready {st.get('nodesReady', '-')}" + (f" ({stuck})" if stuck else "")
        return (ed if cond.get("status") == "True" else None), note

    return em, _wait("rollout", available, timeout, echo)


def host_labels() -> dict[str, str]:
    """Labels this machine would carry as a node (arch, and the NFD CPU flag the profiles use)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    labels = {"kubernetes.io/arch": arch}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vnni" in flags.split():
        labels["feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI"] = "true"
    if shutil.which("nvidia-smi"):
        labels.update({"nvidia.com/gpu.present": "true"})
    return labels


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_here(cluster, em: dict, echo) -> dict:
    """Fetch this machine's variant the way the init container does, serve it, measure accuracy."""
    profiles = [HardwareProfile.model_validate(p) for p in _get(cluster, "hardwareprofiles")["items"]]
    variants = {v["profile"]: v for v in em["status"]["variants"] if v.get("state") == "Ready"}
    labels = host_labels()
    mine = resolve_nodes({"this-machine": labels}, profiles)["this-machine"]
    fallback = next((p.metadata["name"] for p in profiles
                     if p.metadata["name"] in variants and p.spec.target.runtime == "onnxruntime"
                     and label_selector_matches(p.spec.node_selector, labels)), None)
    chosen = mine if mine in variants else fallback
    if chosen is None:
        raise DemoError(f"no Ready variant fits this machine (labels {labels})")
    if chosen != mine:
        echo(f"  this machine is class {mine}; its variant is not ready, serving {chosen} instead")
    variant = variants[chosen]
    cache = Path(tempfile.mkdtemp(prefix="edgefleet-demo-cache-"))
    port = dc.free_port()
    echo(f"  this machine is class {chosen}: fetching {variant['digest'][:19]}... and serving it on :{port}")
    log = cache / "runtime.log"
    try:
        subprocess.run(["edgefleet-runtime", "fetch", f"--ref={variant['artifact']}",
                        f"--digest={variant['digest']}", f"--cache={cache}", "--name=digits", "--insecure"],
                       check=True, capture_output=True)
        with log.open("wb") as out:
            server = subprocess.Popen(["edgefleet-runtime", "serve", f"--model={cache}/current/digits",
                                       f"--digest={variant['digest']}", "--name=digits", f"--port={port}",
                                       "--host=127.0.0.1", "--threads=1"], stdout=out, stderr=subprocess.STDOUT)
        try:
            return {"profile": chosen, **_score("127.0.0.1", port, server, log, echo)}
        finally:
            _stop(server)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _score(host: str, port: int, server: subprocess.Popen | None, log: Path | None, echo,
           samples: int = 200) -> dict:
    data = np.load(QUICKSTART / "digits_eval.npz")
    x, y = data["input"][:samples], data["y"][:samples]
    url = f"http://{host}:{port}/v2/models/digits/infer"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=2)
            break
        except OSError:
            if (server is not None and server.poll() is not None) or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-1500:] if log else ""
                raise DemoError(f"the runtime at {host}:{port} did not become ready; its log ends:\n{tail}") from None
            time.sleep(0.2)
    correct, latencies = 0, []
    for img, label in zip(x, y, strict=True):
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": img.ravel().tolist()}]}).encode()
        start = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"})) as r:
            out = json.loads(r.read())
        latencies.append((time.perf_counter() - start) * 1000)
        correct += int(np.argmax(out["outputs"][0]["data"]) == label)
    echo(f"  sent {len(y)} inference requests over HTTP: top-1 {correct / len(y):.1%}")
    return {"requests": len(y), "accuracy": correct / len(y), "p50Ms": float(np.percentile(latencies, 50))}


def class_tables(cluster, em: dict, ed: dict) -> list[dict]:
    profiles = [HardwareProfile.model_validate(p) for p in _get(cluster, "hardwareprofiles")["items"]]
    nodes = {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in _get(cluster, "nodes")["items"]}
    per_class = Counter(p for p in resolve_nodes(nodes, profiles).values())
    variants = {v["profile"]: v for v in em["status"]["variants"]}
    classes = {c["profile"]: c for c in ed["status"].get("classes", [])}
    rows = []
    for name in sorted(per_class, key=lambda p: (p is None, p or "")):
        v, c = variants.get(name, {}), classes.get(name, {})
        rows.append({
            "class": name or "(no profile)", "nodes": per_class[name],
            "variant": f"{v.get('format', '-')}/{v.get('precision', '-')} {v.get('quantization', '')}".strip(),
            "sizeBytes": v.get("sizeBytes"), "latencyP50Ms": v.get("latencyP50Ms"),
            "accuracyDelta": v.get("accuracyDelta"), "podsReady": f"{c.get('ready', 0)}/{c.get('desired', 0)}",
            "state": v.get("state", "no variant") if name else "unmatched: runs nothing",
            "why": v.get("message", "") if v.get("state") != "Ready" else "",
            "podsWhy": c.get("message", ""),
        })
    return rows


def print_tables(rows: list[dict], here: dict, echo=click.echo) -> None:
    for row in rows:
        echo(f"\n== {row['class']}")
        size = f"{row['sizeBytes'] / 1024:.0f} KiB" if row["sizeBytes"] else "-"
        lat = f"{row['latencyP50Ms']:.3f} ms p50 (compile host)" if row["latencyP50Ms"] is not None else "-"
        acc = f"{row['accuracyDelta']:+.2f} points" if row["accuracyDelta"] is not None else "-"
        for key, value in [("nodes", row["nodes"]), ("variant", row["variant"]), ("size", size),
                           ("latency", lat), ("accuracy delta", acc), ("pods ready", row["podsReady"]),
                           ("state", row["state"])]:
            echo(f"   {key:<15} {value}")
        if row["why"]:
            echo(f"   {'why':<15} {row['why'][:200]}")
        if row.get("podsWhy"):
            echo(f"   {'pods':<15} {row['podsWhy'][:200]}")
    where = f"pod {here['pod']} on the real node {here['node']}, " if here.get("pod") else "a host process, "
    echo(f"\n== this machine ({here['profile']}; {where}{here['requests']} requests): top-1 {here['accuracy']:.1%}, "
         f"p50 {here['p50Ms']:.2f} ms over HTTP")


def real_node_reason(name: str) -> str | None:
    """Why the demo cannot run the operator and this machine's runtime as pods on a real node (None: it can)."""
    from .images.sync import unbuilt

    if reason := dc.real_node_skip_reason(name):
        return reason
    if missing := unbuilt():
        return f"images not built ({', '.join(missing)}); run `edgefleet images build`"
    return None


def real_node_values(cluster, digests: dict[str, str], repository: str = "edgefleet",
                     executor: str = "job") -> dict:
    """Chart values for the real node: images from the cluster registry (containerd mirrors ghcr.io to it)
    pinned by digest, variants in the registry as pods reach it, the node cache on a hostPath of the cluster's
    state, the operator and compile Jobs on the real node (compile Jobs: the compiler image has every toolchain)."""
    placement = {"nodeSelector": {REAL_NODE_TAINT: "true"}, "tolerations": [REAL_NODE_TOLERATION]}
    return {
        "images": {"registry": "ghcr.io/edgefleet", "digests": digests},
        "artifactStore": {"url": f"oci://{cluster.pod_registry}/{repository}", "insecure": True},
        "nodeCache": {"hostPath": cluster.real_node["nodeCache"]},
        "compile": {"executor": executor, **placement,
                    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}},
        **placement,
    }


def install_chart_on_real_node(cluster, echo, timeout: float = 180) -> None:
    """helm install with the operator as a pod on the real node, in a namespace enforcing the restricted Pod
    Security Standard; waits until it is Ready and has applied the built-in profiles."""
    from .images.sync import sync

    digests = sync(f"{cluster.registry}/edgefleet", echo=lambda _: None)
    echo(f"installing the edgefleet chart with helm; the operator runs as a pod on the real node "
         f"{cluster.real_node['name']}")
    cluster.kubectl("create", "namespace", "edgefleet-system", check=False)
    cluster.kubectl("label", "--overwrite", "namespace", "edgefleet-system",
                    "pod-security.kubernetes.io/enforce=restricted")
    values_doc = real_node_values(cluster, digests)
    crd = cluster.kubectl("get", "crd", "edgemodels.edgefleet.io", "-o", "json", check=False)
    if crd.returncode == 0 and json.loads(crd.stdout)["metadata"].get("labels", {}).get(
            "app.kubernetes.io/managed-by") != "Helm":
        echo("  the CRDs exist and helm does not own them (kubectl applied them): the chart leaves them alone")
        values_doc["crds"] = {"enabled": False}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as values:
        json.dump(values_doc, values)
        values.flush()
        cluster.helm("upgrade", "--install", "edgefleet", str(CHART), "--namespace", "edgefleet-system",
                     "-f", values.name)

    def operator_ready():
        pods = _get(cluster, "pods", "-n", "edgefleet-system", "-l", "app.kubernetes.io/component=operator")["items"]
        ready = [p for p in pods if _ready(p) and not p["metadata"].get("deletionTimestamp")]
        found = cluster.kubectl("get", "hardwareprofiles", "-o", "name", check=False).stdout.split()
        return bool(ready) and len(found) >= 6, f"operator pods ready {len(ready)}/{len(pods)}, " \
                                                 f"{len(found)} HardwareProfiles"

    _wait("operator pod", operator_ready, timeout, echo)


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def tolerate_real_node(cluster, echo) -> str:
    """Let the real node's hardware class run pods there (the node's taint keeps every other pod off); returns
    the class."""
    node = cluster.real_node["name"]
    labels = _get(cluster, "node", node)["metadata"].get("labels", {})
    profiles = [HardwareProfile.model_validate(p) for p in _get(cluster, "hardwareprofiles")["items"]]
    mine = resolve_nodes({node: labels}, profiles)[node]
    if mine is None:
        raise DemoError(f"the real node {node} belongs to no hardware class (labels {labels})")
    tolerations = next(p for p in profiles if p.metadata["name"] == mine).spec.model_dump(
        by_alias=True, exclude_none=True).get("tolerations", [])
    if not any(t.get("key") == REAL_NODE_TAINT for t in tolerations):
        echo(f"letting class {mine} onto the real node {node} (a toleration of {REAL_NODE_TAINT})")
        patch = [{"op": "add", "path": "/spec/tolerations", "value": [*tolerations, REAL_NODE_TOLERATION]}]
        cluster.kubectl("patch", "hardwareprofile", mine, "--type=json", "-p", json.dumps(patch))
    return mine


def trust_demo_namespace(cluster, echo) -> None:
    """As the cluster admin: the fleet has Coral boxes, whose class runs privileged pods and so serves only the
    namespaces its HardwareProfile lists (spec.allowedNamespaces, docs/security.md)."""
    names = trust_with_privileged_classes(cluster, NAMESPACE)
    echo(f"as the cluster admin: namespace {NAMESPACE} may use the privileged classes {', '.join(names)} "
         f"(their HardwareProfiles' spec.allowedNamespaces)")


def serve_on_real_node(cluster, profile: str, em: dict, echo, timeout: float) -> dict:
    """This machine's answers: the runtime pod of its class on the real node, queried at its pod IP."""
    digest = next((v["digest"] for v in em["status"]["variants"] if v["profile"] == profile
                   and v.get("state") == "Ready"), None)
    if digest is None:
        raise DemoError(f"no Ready variant for the real node's class {profile}; see the EdgeModel's status")

    def pod():
        pods = [p for p in _get(cluster, "pods", "-n", NAMESPACE, "-l", f"edgefleet.io/profile={profile}")["items"]
                if p["spec"].get("nodeName") == cluster.real_node["name"] and _ready(p)
                and p["metadata"].get("annotations", {}).get("edgefleet.io/variant-digest") == digest]
        return (pods[0] if len(pods) == 1 else None), f"{len(pods)} Ready pods serving {digest[:19]}"

    found = _wait(f"the {profile} pod on the real node", pod, timeout, echo)
    name, ip = found["metadata"]["name"], found["status"]["podIP"]
    echo(f"  this machine is the real node {cluster.real_node['name']}, class {profile}: pod {name} at {ip}")
    return {"profile": profile, "pod": name, "node": cluster.real_node["name"],
            **_score(ip, 8080, None, None, echo)}


def run_demo(name: str, echo, timeout: float = 600) -> tuple[list[dict], dict]:
    started = time.monotonic()
    reason = real_node_reason(name)
    if reason is None:
        cluster = stack.up(name, echo=echo, real_node=True)
        install_chart_on_real_node(cluster, echo)
        profile = tolerate_real_node(cluster, echo)
        trust_demo_namespace(cluster, echo)
        echo("applying examples/quickstart/ (kubectl apply --server-side -k examples/quickstart/)")
        cluster.kubectl("apply", "--server-side", "-k", str(QUICKSTART))
        em, ed = wait_served(cluster, echo, timeout)
        echo("sending inference requests to this machine's runtime pod")
        here = serve_on_real_node(cluster, profile, em, echo, timeout)
        rows = class_tables(cluster, em, ed)
        echo(f"done in {time.monotonic() - started:.0f}s")
        return rows, here
    echo(f"no real node ({reason}): the operator and this machine's runtime run as processes here")
    cluster = stack.up(name, echo=echo)
    install_chart(cluster, echo)
    operator = start_operator(cluster, cluster.state / "logs" / "operator.log", echo)
    try:
        trust_demo_namespace(cluster, echo)
        echo("applying examples/quickstart/ (kubectl apply --server-side -k examples/quickstart/)")
        cluster.kubectl("apply", "--server-side", "-k", str(QUICKSTART))
        em, ed = wait_served(cluster, echo, timeout)
        echo("starting the runtime for this machine's class")
        here = serve_here(cluster, em, echo)
        rows = class_tables(cluster, em, ed)
    finally:
        _stop(operator)
    echo(f"done in {time.monotonic() - started:.0f}s")
    return rows, here


@click.command("demo")
@click.option("--name", default=lambda: os.environ.get("EDGEFLEET_DEMO_CLUSTER", DEMO_CLUSTER),
              show_default=DEMO_CLUSTER, help="Local cluster to use (started when not running; "
              "$EDGEFLEET_DEMO_CLUSTER). Not the test session's: the demo's pods keep its GPU nodes busy.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for compile and rollout.")
def demo_command(name: str, timeout: float) -> None:
    """Bring up the local cluster, install the chart, apply the quickstart, serve and query this
    machine's variant, and print one table per hardware class."""
    def echo(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        rows, here = run_demo(name, echo, timeout)
    except (DemoError, dc.ClusterError, subprocess.CalledProcessError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    print_tables(rows, here)
    click.echo(f"\nThe cluster keeps running: `edgefleet cluster status`, `edgefleet cluster down --name {name}`.")
