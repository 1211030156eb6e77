"""Fleet monitoring on the dev cluster's real node: the operator (in a thread) serves the quickstart on the real
node with spec.monitoring.drift and spec.feedback.hardExamples. Clean and noisy digits go to the real pod; the
artifacts it uploads to the cluster registry hold exactly the inputs it answered with low confidence (counted from
its own answers), and a shifted input distribution turns Drifting True within the configured interval.

Bounded: one class, fp32 only, one pod on the real node, ~400 requests to its pod IP, every wait has a deadline.
Skipped, with the reason, where there is no real node or the images are not built."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socketserver
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kube_helpers import get, wait_for
from operator_helpers import quickstart_into
from real_node_helpers import TAINT_KEY, TOLERATION, eval_set, real_node_class, serving_pod
from relay import Relay
from test_real_node_on_target import registry  # noqa: F401 (registry: a fixture both sides reach)

pytestmark = pytest.mark.cluster

LOW = 0.9
RESULTS: dict = {}
REPORT = Path(__file__).resolve().parents[2] / "build" / "real-node-monitoring.json"
DRIFT = {"threshold": 0.2, "windowSize": 100, "intervalSeconds": 5}


def _infer(ip: str, x: np.ndarray) -> np.ndarray:
    """Send each sample alone; the top-1 probability of every answer."""
    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    conf = []
    try:
        for image in x:
            body = json.dumps({"inputs": [{"name": "input", "shape": [1, *image.shape], "datatype": "FP32",
                                           "data": image.ravel().tolist()}]})
            conn.request("POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            out = json.loads(resp.read())
            assert resp.status == 200, out
            logits = np.asarray(out["outputs"][0]["data"], np.float64)
            p = np.exp(logits - logits.max())
            conf.append(float((p / p.sum()).max()))
    finally:
        conn.close()
    return np.asarray(conf)


def _drifting(cluster, namespace: str) -> dict | None:
    conds = get(cluster, namespace, "edgedeployment", "digits").get("status", {}).get("conditions", [])
    return next((c for c in conds if c["type"] == "Drifting"), None)


@contextlib.contextmanager
def _kept_class(cluster, profile: str, digests: dict[str, str]):
    """The class tolerates the real node and runs the runtime image just built (pinned by digest: the node keeps
    older images under the same tag) while this module runs; other modules restore the shared profile when they
    end, so it is put back when it goes (checked every 2 s), and restored at the end."""
    before = get(cluster, None, "hardwareprofile", profile)["spec"]
    repository = before["runtimeImage"].split("@")[0].rsplit(":", 1)[0]
    pinned = f"{repository}@{digests[repository.rsplit('/', 1)[1]]}"
    stop = threading.Event()

    def ensure() -> None:
        spec = get(cluster, None, "hardwareprofile", profile)["spec"]
        patch = [{"op": "replace", "path": "/spec/runtimeImage", "value": pinned}]
        if TOLERATION not in spec.get("tolerations", []):
            patch.append({"op": "add", "path": "/spec/tolerations", "value": [*spec.get("tolerations", []),
                                                                               TOLERATION]})
        if spec["runtimeImage"] != pinned or len(patch) > 1:
            cluster.kubectl("patch", "hardwareprofile", profile, "--type=json", "-p", json.dumps(patch), check=False)

    def keep() -> None:
        while not stop.wait(2):
            ensure()

    ensure()
    thread = threading.Thread(target=keep, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        restore = [{"op": "replace", "path": "/spec/runtimeImage", "value": before["runtimeImage"]},
                   {"op": "replace", "path": "/spec/tolerations", "value": before.get("tolerations", [])}]
        cluster.kubectl("patch", "hardwareprofile", profile, "--type=json", "-p", json.dumps(restore), check=False)


class Switchable:
    """The registry behind a port on the node's bridge that the test can take away and bring back (same port)."""

    def __init__(self, cluster):
        host, port = cluster.registry.split(":")
        self.target = (host, int(port))
        self.host = cluster.pod_registry.split(":")[0]
        self.port = 0
        self.server: socketserver.ThreadingTCPServer | None = None

    def up(self) -> None:
        server = socketserver.ThreadingTCPServer((self.host, self.port), Relay, bind_and_activate=False)
        server.allow_reuse_address = server.daemon_threads = True
        server.target = self.target  # what Relay forwards to
        server.server_bind()
        server.server_activate()
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@pytest.fixture(scope="module")
def hard_registry(cluster):
    switch = Switchable(cluster)
    switch.up()
    yield switch
    switch.down()


@pytest.fixture(scope="module")
def monitored(cluster, real_node, registry, hard_registry):  # noqa: F811
    """The quickstart in a namespace of its own, served on the real node with monitoring and hard examples by the
    operator in a thread watching only that namespace."""
    from edgefleet_dev.net import free_port
    from kopf.testing import KopfRunner

    namespace = f"mon-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)
    profile = real_node_class(cluster)
    env = {"KUBECONFIG": str(cluster.kubeconfig), "EDGEFLEET_NAMESPACE": namespace,
           "EDGEFLEET_ARTIFACT_STORE": f"oci://{registry}/edgefleet-monitoring/{namespace}",
           "EDGEFLEET_ARTIFACT_INSECURE": "true", "EDGEFLEET_RESYNC_SECONDS": "20",
           "EDGEFLEET_COMPILE_TIMING_RUNS": "10", "EDGEFLEET_METRICS_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with _kept_class(cluster, profile, real_node), KopfRunner(
                ["run", "--standalone", "-n", namespace, "-m", "edgefleet.handlers"], timeout=60):
            # the pods push with their namespace's token: the store lets them push under its tenant repository only
            yield _serve(cluster, namespace, profile,
                         f"oci://{hard_registry.address}/edgefleet/tenants/{namespace}/hard")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _serve(cluster, namespace: str, profile: str, destination: str) -> dict:
    quickstart_into(cluster, namespace)
    cluster.kubectl("patch", "edgemodel", "digits", "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"targetProfiles": {"names": [profile]}, "optimization": {"quantization": "none",
                                                                          "selection": "host"}}}))
    cluster.kubectl("patch", "edgedeployment", "digits", "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"nodeSelector": {"matchLabels": {TAINT_KEY: "true"}},
                  "monitoring": {"confidenceBelow": LOW, "drift": DRIFT},
                  "feedback": {"hardExamples": {"confidenceBelow": LOW, "destination": destination,
                                                "batchSize": 10, "uploadIntervalSeconds": 2}}}}))
    variant = wait_for(lambda: next((v for v in get(cluster, namespace, "edgemodel", "digits").get(
        "status", {}).get("variants", []) if v["profile"] == profile and v.get("state") == "Ready"), None),
        420, 2, f"the {profile} variant")
    pod = wait_for(lambda: serving_pod(cluster, namespace, profile, variant["digest"]), 240, 1,
                   "a Ready pod on the real node with monitoring")
    return {"namespace": namespace, "profile": profile, "pod": pod, "variant": variant, "repository": destination}


def _wait_drifting(cluster, namespace: str, status: str, timeout: float, ip: str) -> dict:
    """The Drifting condition once it has ``status``; on timeout the last one and the pods (a pod replaced by a
    change of the shared HardwareProfile starts with an empty window)."""
    deadline, cond = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        cond = _drifting(cluster, namespace)
        if cond and cond["status"] == status:
            return cond
        time.sleep(0.5)
    pods = [(p["metadata"]["name"], p["status"].get("podIP")) for p in
            json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]]
    raise AssertionError(f"Drifting not {status} after {timeout}s: {cond}; pods {pods}, traffic went to {ip}")


def _metric(ip: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_uploaded_hard_examples_are_exactly_the_low_confidence_inputs_then_drift_turns_true(
        cluster, monitored, hard_registry, tmp_path):
    from edgefleet.artifacts.examples import pull
    from edgefleet.artifacts.store import StoreError

    ns, ip = monitored["namespace"], monitored["pod"]["status"]["podIP"]
    args = monitored["pod"]["spec"]["containers"][0]["args"]
    assert "--drift-eval=/etc/edgefleet/evaluation/data.npz" in args and "--monitoring" in args
    x, _ = eval_set()
    rng = np.random.default_rng(7)

    # traffic like the evaluation data fills the window: not drifting
    clean_conf = _infer(ip, x[:100])
    cond = wait_for(lambda: (c := _drifting(cluster, ns)) and c["status"] != "Unknown" and c, 60, 1,
                    "a Drifting verdict on a full window")
    assert cond["status"] == "False", cond

    # the registry goes away; a mix of clean and strongly noisy digits: the unsure ones wait on the node
    hard_registry.down()
    mix = np.concatenate([x[100:140], (x[140:180] + rng.normal(0, 1.5, x[140:180].shape)).astype(np.float32)])
    mix_conf = _infer(ip, mix)
    want = np.concatenate([x[:100][clean_conf < LOW], mix[mix_conf < LOW]])
    assert 0 < (mix_conf < LOW).sum() < len(mix), "the mix needs both sure and unsure answers"
    failed = _metric(ip, "edgefleet_runtime_hard_examples_upload_failures_total")
    wait_for(lambda: _metric(ip, "edgefleet_runtime_hard_examples_upload_failures_total") >= failed + 2, 90, 1,
             "two failed pushes while the registry is away")
    stored = _metric(ip, "edgefleet_runtime_hard_examples_stored")
    uploaded = _metric(ip, "edgefleet_runtime_hard_examples_uploaded_total")
    assert stored >= (mix_conf < LOW).sum() and stored + uploaded == len(want), (stored, uploaded, len(want))
    RESULTS.update({"storedWhileRegistryAway": stored, "uploadedBefore": uploaded})
    hard_registry.up()  # back on the same port: everything goes up

    def pulled():
        try:
            arrays = pull(monitored["repository"], tmp_path / "hard.npz", insecure=True)
        except StoreError:
            return None  # nothing pushed yet
        return arrays if len(arrays.get("confidence", [])) >= len(want) else None

    try:
        arrays = wait_for(pulled, 90, 2, f"{len(want)} hard examples in the registry")
    except AssertionError:
        pod = monitored["pod"]["metadata"]["name"]
        print(cluster.kubectl("logs", "-n", ns, pod, "-c", "runtime", "--tail=20", check=False).stdout)
        raise
    RESULTS.update({"sent": 100 + len(mix), "noisy": len(mix) // 2, "answeredBelow": len(want),
                    "uploaded": len(arrays["confidence"])})
    assert len(arrays["confidence"]) == len(want)
    np.testing.assert_allclose(arrays["input"], want, rtol=0, atol=1e-6)
    assert (arrays["confidence"] < LOW).all()
    assert set(arrays["node"].tolist()) == {cluster.real_node["name"]}
    assert set(arrays["class"].tolist()) == {monitored["profile"]}
    assert set(arrays["model_digest"].tolist()) == {monitored["variant"]["digest"]}

    # clean traffic again fills the window (the noisy mix may have tipped it): Drifting goes back to False
    _infer(ip, x[300:400])
    _wait_drifting(cluster, ns, "False", DRIFT["intervalSeconds"] * 3 + 15, ip)
    # shift the input distribution (brighter, flatter digits): Drifting turns True within the interval
    shifted = (x[200:300] * 0.2 + 2.0).astype(np.float32)
    _infer(ip, shifted)
    sent = time.monotonic()
    cond = _wait_drifting(cluster, ns, "True", DRIFT["intervalSeconds"] * 3 + 15, ip)
    took = time.monotonic() - sent
    RESULTS.update({"driftingTrueAfterSeconds": round(took, 1), "intervalSeconds": DRIFT["intervalSeconds"],
                    "drifting": cond["message"]})
    # kopf's runner captures stdout while it runs: the numbers go to a file
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(RESULTS, indent=2))
    assert cond["reason"] == "DistributionShift"
    assert f"{monitored['profile']}: " in cond["message"] and ">= 0.2" in cond["message"]
    assert "input PSI" in cond["message"]
