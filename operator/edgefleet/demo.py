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

from .api import HardwareProfile, label_selector_matches
from .devcluster import cluster as dc
from .progress import Progress
from .render import resolve_nodes

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
CHART = REPO / "charts" / "edgefleet"
NAMESPACE = "edgefleet-demo"
DEMO_CLUSTER = "default"  # the tests never reuse it unless EDGEFLEET_CLUSTER names it


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
            return {"profile": chosen, **_score(port, server, log, echo)}
        finally:
            _stop(server)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _score(port: int, server: subprocess.Popen, log: Path, echo, samples: int = 200) -> dict:
    data = np.load(QUICKSTART / "digits_eval.npz")
    x, y = data["input"][:samples], data["y"][:samples]
    url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-1500:]
                raise DemoError(f"the runtime did not become ready; its log ends:\n{tail}") from None
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
    echo(f"\n== this machine ({here['profile']}): {here['requests']} requests, top-1 {here['accuracy']:.1%}, "
         f"p50 {here['p50Ms']:.2f} ms over HTTP")


def run_demo(name: str, echo, timeout: float = 600) -> tuple[list[dict], dict]:
    started = time.monotonic()
    cluster = dc.up(name, echo=echo)
    install_chart(cluster, echo)
    operator = start_operator(cluster, cluster.state / "logs" / "operator.log", echo)
    try:
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
