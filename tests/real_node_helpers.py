"""Helpers for tests on the dev cluster's real node: the chart's operator as a real pod, the quickstart's
class tolerating the real node's taint, and inference clients that count every request."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kube_helpers import get, is_ready, items, wait_for

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "edgefleet"
EVAL = REPO / "examples" / "quickstart" / "digits_eval.npz"
OPERATOR_NAMESPACE = "edgefleet-system"
RELEASE = "edgefleet"
TAINT_KEY = "edgefleet.io/real-node"
TOLERATION = {"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}


def skip_reason(cluster, unbuilt: list[str]) -> str | None:
    """Why real-node tests cannot run on this cluster (None: they can)."""
    from edgefleet_dev.devcluster.cluster import real_node_skip_reason

    name = cluster.state.name
    if cluster.real_node is None:
        why = real_node_skip_reason(name) or (f"cluster {name!r} runs without one; add it with "
                                              f"`edgefleet cluster up --name {name} --real-node`")
        return f"no real node: {why}"
    if unbuilt:
        return f"images not built: {', '.join(unbuilt)}; run `edgefleet images build`"
    return None


def chart_values(cluster, digests: dict[str, str], executor: str = "job", repository: str = "edgefleet-e2e") -> dict:
    """The chart on the real node as `edgefleet demo` installs it (demo.real_node_values), variants in a
    repository of the tests' own; CRDs left to the session (edgefleet_api): helm must not adopt them."""
    from edgefleet_dev.demo import real_node_values

    return {"crds": {"enabled": False}, **real_node_values(cluster, digests, repository, executor)}


def install_operator(cluster, values: dict, tmp: Path, timeout: float = 180, pod_security: str = "restricted") -> float:
    """helm upgrade --install into a namespace that enforces `pod_security` (the restricted Pod Security Standard
    unless the release carries the node cache's CSI driver, a privileged DaemonSet); returns seconds until the
    operator pod is Ready."""
    ns = OPERATOR_NAMESPACE
    wait_for(lambda: _not_terminating(cluster, ns), 120, 1, f"namespace {ns} left by an earlier run to be deleted")
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.kubectl("label", "--overwrite", "namespace", ns, f"pod-security.kubernetes.io/enforce={pod_security}")
    path = tmp / "values.json"
    path.write_text(json.dumps(values))
    started = time.monotonic()
    cluster.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", ns, "-f", str(path))
    wait_for(lambda: operator_pod(cluster), timeout, what="the operator pod Ready on the real node")
    return time.monotonic() - started


def _not_terminating(cluster, namespace: str) -> bool:
    out = cluster.kubectl("get", "namespace", namespace, "-o", "jsonpath={.status.phase}", check=False)
    return out.returncode != 0 or out.stdout.strip() != "Terminating"


def operator_pod(cluster) -> dict | None:
    """The one live, Ready operator pod on the real node (None while there is not exactly one)."""
    pods = [p for p in items(cluster, OPERATOR_NAMESPACE, "pods", "-l", "app.kubernetes.io/component=operator")
            if not p["metadata"].get("deletionTimestamp")]
    if len(pods) != 1 or not is_ready(pods[0]):
        return None
    return pods[0] if pods[0]["spec"].get("nodeName") == cluster.real_node["name"] else None


def uninstall_operator(cluster) -> None:
    cluster.helm("uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE, "--wait", check=False)
    cluster.kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--wait=false", check=False)


def real_node_class(cluster) -> str:
    """The hardware class the real node belongs to, by its labels and the cluster's HardwareProfiles."""
    from edgefleet.api import HardwareProfile
    from edgefleet.render import resolve_nodes

    name = cluster.real_node["name"]
    labels = get(cluster, None, "node", name)["metadata"]["labels"]
    profiles = [HardwareProfile.model_validate(p) for p in items(cluster, None, "hardwareprofiles")]
    profile = resolve_nodes({name: labels}, profiles)[name]
    assert profile, f"the real node {name} belongs to no hardware class (labels {labels})"
    return profile


USERS = "edgefleet.io/real-node-tests"  # on a HardwareProfile: who needs its toleration of the real node now
STALE_SECONDS = 7200  # a user this old crashed without leaving: it no longer counts


@contextlib.contextmanager
def tolerating_real_node(cluster, profile: str):
    """Let the class's pods onto the real node (its taint keeps every other pod off). Modules running at the same
    time share the toleration: each adds itself to the profile's USERS annotation, and the last one out removes
    the toleration (a plain restore would pull it from under the others' pods)."""
    me = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
    _toleration_users(cluster, profile, lambda users: users | {me})
    try:
        yield
    finally:
        _toleration_users(cluster, profile, lambda users: users - {me})


def _toleration_users(cluster, profile: str, change) -> None:
    """Read-modify-write of the users and the toleration, the resourceVersion as precondition (retried)."""
    for _ in range(20):
        obj = get(cluster, None, "hardwareprofile", profile)
        listed = (obj["metadata"].get("annotations") or {}).get(USERS, "")
        fresh = {u for u in listed.split(",") if u and time.time() - int(u.split("-")[0]) < STALE_SECONDS}
        users = change(fresh)
        tolerations = [t for t in obj["spec"].get("tolerations", []) if t != TOLERATION]
        patch = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"],
                              "annotations": {USERS: ",".join(sorted(users)) or None}},
                 "spec": {"tolerations": [*tolerations, TOLERATION] if users else tolerations}}
        done = cluster.kubectl("patch", "hardwareprofile", profile, "--type=merge", "-p", json.dumps(patch),
                               check=False)
        if done.returncode == 0:
            return
        if "Conflict" not in done.stderr and "modified" not in done.stderr:
            raise AssertionError(f"patching {profile}'s tolerations failed: {done.stderr}")
        time.sleep(0.2)
    raise AssertionError(f"{profile}'s tolerations kept changing under the patch")


def real_pods(cluster, namespace: str, profile: str) -> list[dict]:
    """The live runtime pods of `profile` on the real node."""
    return [p for p in items(cluster, namespace, "pods", "-l", f"edgefleet.io/profile={profile}")
            if p["spec"].get("nodeName") == cluster.real_node["name"] and not p["metadata"].get("deletionTimestamp")]


def serving_pod(cluster, namespace: str, profile: str, digest: str) -> dict | None:
    """The one Ready pod on the real node serving `digest`, else None."""
    pods = real_pods(cluster, namespace, profile)
    if len(pods) != 1 or not is_ready(pods[0]):
        return None
    return pods[0] if pods[0]["metadata"]["annotations"].get("edgefleet.io/variant-digest") == digest else None


def eval_set(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(EVAL)
    return data["input"][:limit], data["y"][:limit]


@dataclass
class Tally:
    """Every request counted: answered (HTTP 200 with logits), failed (anything else), correct top-1."""

    sent: int = 0
    ok: int = 0
    correct: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    digests: set[str] = field(default_factory=set)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def top1(self) -> float:
        return self.correct / self.ok if self.ok else 0.0

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 50)) if self.latencies_ms else float("nan")


def infer_one(host: str, port: int, image: np.ndarray, tally: Tally, label: int | None = None,
              conn: http.client.HTTPConnection | None = None, timeout: float = 5, model: str = "digits") -> None:
    """One OIP v2 request (a new connection unless `conn` is given), counted in `tally`."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, *image.shape], "datatype": "FP32",
                                   "data": image.ravel().tolist()}]})
    own = conn is None
    conn = conn or http.client.HTTPConnection(host, port, timeout=timeout)
    tally.sent += 1
    start = time.perf_counter()
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        elapsed = (time.perf_counter() - start) * 1000
        if resp.status != 200:
            tally.failures.append(f"HTTP {resp.status}: {data[:200]!r}")
            return
        out = json.loads(data)
        logits = out["outputs"][0]["data"]
    except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
        tally.failures.append(f"{type(err).__name__}: {err}")
        if not own:
            conn.close()
        return
    finally:
        if own:
            conn.close()
    tally.ok += 1
    tally.latencies_ms.append(elapsed)
    if out.get("model_version"):
        tally.digests.add(out["model_version"])
    if label is not None:
        tally.correct += int(int(np.argmax(logits)) == int(label))


def score(host: str, port: int, x: np.ndarray, y: np.ndarray, keep_alive: bool = True,
          model: str = "digits") -> Tally:
    """Send every sample once; count answers, failures and correct top-1."""
    tally = Tally()
    conn = http.client.HTTPConnection(host, port, timeout=5) if keep_alive else None
    try:
        for image, label in zip(x, y, strict=True):
            # a closed connection reopens on the next request
            infer_one(host, port, image, tally, label, conn, model=model)
    finally:
        if conn is not None:
            conn.close()
    return tally


def registry_up(cluster) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{cluster.registry}/v2/", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as err:
        return err.code == 401  # it answers: with its token challenge
    except OSError:
        return False


@contextlib.contextmanager
def registry_stopped(cluster):
    """The cluster's artifact store stopped (the node is offline from it), then started again on the same port and
    storage."""
    from edgefleet_dev.devcluster import start_registry, stop_registry

    stop_registry(cluster)
    try:
        yield
    finally:
        start_registry(cluster)
        wait_for(lambda: registry_up(cluster), 30, 0.2, "the registry to answer again")


def events_for(cluster, namespace: str, name: str) -> list[dict]:
    return items(cluster, namespace, "events", "--field-selector", f"involvedObject.name={name}")
