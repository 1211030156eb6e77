"""End to end on the dev cluster's real node: the chart's operator runs as a real pod (restricted Pod Security),
compiles the quickstart in a compile Job, and the class the real node belongs to serves it from a real runtime
pod: fetched into the node's hostPath cache, digest-checked, probed by the kubelet, reached through its pod IP
and its Service. Skipped, with the reason, where there is no real node or the images are not built.

Traffic goes only to the pods and Service this module creates (on the node's bridge) and to a runtime process
it starts on loopback; every loop is bounded in count and time. Timings are printed (`pytest -s`)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from kube_helpers import get, wait_for
from operator_helpers import quickstart_into
from real_node_helpers import (
    OPERATOR_NAMESPACE,
    Tally,
    chart_values,
    eval_set,
    infer_one,
    install_operator,
    operator_pod,
    real_node_class,
    registry_stopped,
    registry_up,
    score,
    serving_pod,
    tolerating_real_node,
    uninstall_operator,
)

pytestmark = pytest.mark.cluster

PROFILES = Path(__file__).resolve().parents[2] / "operator" / "edgefleet" / "profiles"
RECREATED = "cpu-arm64"  # a built-in profile deleted before the install: the operator must create it again
TIMINGS: dict[str, float] = {}


def note(key: str, value: float) -> None:
    TIMINGS[key] = round(value, 3)
    print(f"[real-node timing] {key}: {value:.3f}")


@pytest.fixture(scope="module")
def chart_operator(cluster, real_node, tmp_path_factory):
    """The chart installed with the operator as a real pod on the real node (compile executor: job)."""
    cluster.kubectl("delete", "hardwareprofile", RECREATED, "--ignore-not-found")
    seconds = install_operator(cluster, chart_values(cluster, real_node), tmp_path_factory.mktemp("chart"))
    note("helm install -> operator Ready (s)", seconds)
    yield real_node
    uninstall_operator(cluster)
    # the session's other tests expect the built-in profiles as the files say (the operator pinned images)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PROFILES))
    out = Path(__file__).resolve().parents[2] / "build" / "real-node-timings.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(TIMINGS, indent=2))


@pytest.fixture(scope="module")
def served(cluster, chart_operator):
    """The quickstart in a namespace of its own, its real-node class served by a real pod."""
    namespace = f"rn-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)
    profile = real_node_class(cluster)
    with tolerating_real_node(cluster, profile):
        started = time.monotonic()
        quickstart_into(cluster, namespace)
        variant = wait_for(lambda: _ready_variant(cluster, namespace, profile), 420, 2,
                           f"the {profile} variant compiled by the compile Job")
        pod = wait_for(lambda: serving_pod(cluster, namespace, profile, variant["digest"]), 180, 1,
                       f"a Ready {profile} pod on the real node serving {variant['digest'][:19]}")
        note("quickstart apply -> real pod serving (s)", time.monotonic() - started)
        yield {"namespace": namespace, "profile": profile, "variant": variant, "pod": pod}
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _ready_variant(cluster, namespace: str, profile: str) -> dict | None:
    variants = get(cluster, namespace, "edgemodel", "digits").get("status", {}).get("variants", [])
    mine = next((v for v in variants if v["profile"] == profile), None)
    if mine and mine.get("state") == "Failed":
        raise AssertionError(f"the {profile} variant failed: {mine}")
    return mine if mine and mine.get("state") == "Ready" else None


def test_operator_is_a_real_pod_under_restricted_pod_security_and_applies_the_builtin_profiles(cluster,
                                                                                              chart_operator):
    pod = operator_pod(cluster)
    assert pod is not None, "no Ready operator pod on the real node"
    ns = get(cluster, None, "namespace", OPERATOR_NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert pod["status"]["podIP"].startswith("10.245.0.")
    (container,) = pod["status"]["containerStatuses"]
    assert container["imageID"].endswith(chart_operator["operator"]), container["imageID"]
    # the operator re-created the built-in profile deleted before the install, pinning the runtime by digest
    recreated = wait_for(lambda: cluster.kubectl("get", "hardwareprofile", RECREATED, "--show-managed-fields",
                                                 "-o", "json", check=False).stdout, 60, 1,
                         f"the operator to apply {RECREATED}")
    spec = json.loads(recreated)["spec"]
    assert spec["runtimeImage"] == f"ghcr.io/edgefleet/runtime-cpu@{chart_operator['runtime-cpu']}"
    managers = {m["manager"] for m in json.loads(recreated)["metadata"]["managedFields"]}
    assert "edgefleet" in managers, managers


def test_quickstart_class_on_the_real_node_answers_with_the_compile_reports_top1_via_pod_ip_and_service(
        cluster, served):
    namespace, profile, variant = served["namespace"], served["profile"], served["variant"]
    report = _compile_report(cluster, namespace, profile)
    # on-target selection may serve another candidate than the compiler's own choice: its metrics are checked
    chosen = next((c for c in report["candidates"] if c["sha256"] == variant["digest"]), None)
    assert chosen is not None, f"{variant['digest']} is none of the compile report's candidates"
    assert variant.get("selection") in ("onTarget", "host"), variant
    metrics = chosen["metrics"]
    x, y = eval_set()
    assert metrics["samples"] == len(y), "the compile report measured the whole evaluation set"
    pod = served["pod"]
    statuses = {c["name"]: c for c in pod["status"]["initContainerStatuses"]}
    assert statuses["fetch-model"]["state"]["terminated"]["exitCode"] == 0
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == cluster.real_node["nodeCache"]
    cached = Path(cluster.real_node["nodeCache"]) / "sha256" / variant["digest"].split(":")[1]
    assert cached.is_file(), f"the init container left no {cached} in the node cache"
    direct = score(pod["status"]["podIP"], 8080, x, y)
    service_ip = get(cluster, namespace, "service", "digits")["spec"]["clusterIP"]
    via_service = score(service_ip, 8080, x, y, keep_alive=False)
    baseline = _host_process_score(cluster, variant, x, y)
    for name, tally in (("pod IP", direct), ("Service", via_service), ("host process", baseline)):
        print(f"[real-node] {name}: {tally.sent} sent, {tally.ok} answered, {tally.failed} failed, "
              f"top-1 {tally.top1:.4f}, p50 {tally.p50_ms:.2f} ms")
        assert tally.sent == len(y) and tally.failed == 0, tally.failures[:3]
        assert tally.correct == round(metrics["accuracy"] * len(y)), (name, tally.top1, metrics["accuracy"])
    assert direct.digests == via_service.digests == {variant["digest"].split(":")[1][:12]}
    note("p50 through the Service, new connection per request (ms)", via_service.p50_ms)
    note("p50 host-process runtime, new connection per request (ms)", baseline.p50_ms)
    note("p50 pod IP, keep-alive (ms)", direct.p50_ms)
    # the kubelet probes it: the pod is Ready only after its readiness probe passed
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def _compile_report(cluster, namespace: str, profile: str) -> dict:
    """The compile Job's JSON report for `profile`, read from the registry on loopback."""
    from edgefleet.artifacts import open_store

    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", OPERATOR_NAMESPACE, "-l",
                                      f"edgefleet.io/model-namespace={namespace},app.kubernetes.io/component=compile",
                                      "-o", "json").stdout)["items"]
    assert jobs, "no compile Job ran for the quickstart"
    ref = jobs[-1]["metadata"]["annotations"]["edgefleet.io/report"].replace(cluster.pod_registry, cluster.registry)
    return json.loads(open_store(ref, True).get(ref, ""))["variants"][profile]


def _host_process_score(cluster, variant: dict, x, y):
    """The baseline: the same variant served by edgefleet-runtime on this machine (loopback)."""
    from edgefleet.devcluster.cluster import free_port

    cache = Path(cluster.state / "e2e-host-runtime")
    ref = variant["artifact"].replace(cluster.pod_registry, cluster.registry)
    subprocess.run(["edgefleet-runtime", "fetch", f"--ref={ref}", f"--digest={variant['digest']}",
                    f"--cache={cache}", "--name=digits", "--insecure"], check=True, capture_output=True, timeout=120)
    port = free_port()
    server = subprocess.Popen(["edgefleet-runtime", "serve", f"--model={cache}/current/digits",
                               f"--digest={variant['digest']}", "--name=digits", f"--port={port}",
                               "--host=127.0.0.1", "--threads=1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _ready(port), 60, 0.2, "the host-process runtime")
        return score("127.0.0.1", port, x, y, keep_alive=False)
    finally:
        server.terminate()
        server.wait(30)


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _current(cluster, served) -> dict:
    """The served class's one Ready pod now (tests may have replaced it)."""
    return wait_for(lambda: serving_pod(cluster, served["namespace"], served["profile"], served["variant"]["digest"]),
                    120, 1, "the real-node pod serving the variant")


def _replace_pod(cluster, namespace: str, old: dict) -> None:
    cluster.kubectl("delete", "pod", "-n", namespace, old["metadata"]["name"], "--wait=false")


def _new_pod(cluster, served, old: dict):
    def check():
        pod = serving_pod(cluster, served["namespace"], served["profile"], served["variant"]["digest"])
        return pod if pod and pod["metadata"]["uid"] != old["metadata"]["uid"] else None
    return check


def test_offline_node_starts_a_new_pod_from_its_cache_and_serves_with_the_registry_stopped(cluster, served):
    old = _current(cluster, served)
    x, y = eval_set(100)
    with registry_stopped(cluster):
        assert not registry_up(cluster)
        started = time.monotonic()
        _replace_pod(cluster, served["namespace"], old)
        pod = wait_for(_new_pod(cluster, served, old), 120, 0.5, "a new pod Ready from the node cache")
        note("offline restart: pod deleted -> new pod Ready, registry down (s)", time.monotonic() - started)
        tally = score(pod["status"]["podIP"], 8080, x, y)
        assert tally.sent == len(y) and tally.failed == 0, tally.failures[:3]
        assert tally.top1 > 0.9
        fetch_log = cluster.kubectl("logs", "-n", served["namespace"], pod["metadata"]["name"], "-c",
                                    "fetch-model").stdout
        assert "artifact already cached" in fetch_log, fetch_log[-800:]


def test_corrupt_cached_variant_is_refused_and_fetched_again_never_served(cluster, served):
    """The node cache's copy no longer matches its digest: the new pod's init container refuses it, fetches the
    variant again, and the runtime serves only the verified bytes."""
    old = _current(cluster, served)
    digest = served["variant"]["digest"]
    blob = Path(cluster.real_node["nodeCache"]) / "sha256" / digest.split(":")[1]
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-16] + b"\0" * 16)  # same size, other bytes
    assert hashlib.sha256(blob.read_bytes()).hexdigest() != digest.split(":")[1]
    _replace_pod(cluster, served["namespace"], old)
    pod = wait_for(_new_pod(cluster, served, old), 120, 0.5, "a new pod Ready on the fetched-again variant")
    log = cluster.kubectl("logs", "-n", served["namespace"], pod["metadata"]["name"], "-c", "fetch-model").stdout
    assert "cached artifact is corrupt" in log and "artifact fetched" in log, log[-800:]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest.split(":")[1]
    tally = score(pod["status"]["podIP"], 8080, *eval_set(50))
    assert tally.failed == 0 and tally.ok == 50 and tally.digests == {digest.split(":")[1][:12]}


def _class_message(cluster, namespace: str, profile: str) -> str:
    classes = get(cluster, namespace, "edgedeployment", "digits").get("status", {}).get("classes", [])
    return next((c.get("message", "") for c in classes if c["profile"] == profile), "")


class Poller(threading.Thread):
    """A client polling through the Service, a new connection per request, until stopped (bounded by count)."""

    def __init__(self, host: str, limit: int = 20000):
        super().__init__(daemon=True)
        self.host, self.limit, self.tally, self.stop = host, limit, Tally(), threading.Event()
        self.image = eval_set(1)[0][0]

    def run(self) -> None:
        while not self.stop.is_set() and self.tally.sent < self.limit:
            infer_one(self.host, 8080, self.image, self.tally)
            time.sleep(0.01)


def test_model_update_rolls_the_real_pod_to_the_new_digest_while_a_service_client_sees_no_failures(cluster, served):
    namespace, profile = served["namespace"], served["profile"]
    old = _current(cluster, served)
    old_digest = served["variant"]["digest"]
    # the node's new pod starts beside the old one, which goes once the new one is Ready
    rollout = {"spec": {"rollout": {"maxSurge": 1}}}
    cluster.kubectl("patch", "edgedeployment", "digits", "-n", namespace, "--type=merge", "-p", json.dumps(rollout))
    wait_for(lambda: get(cluster, namespace, "daemonset", f"digits-{profile}")["spec"]["updateStrategy"][
        "rollingUpdate"].get("maxSurge") == 1, 60, 0.5, "the DaemonSet to surge")
    poller = Poller(get(cluster, namespace, "service", "digits")["spec"]["clusterIP"])
    poller.start()
    try:
        time.sleep(2)
        started = time.monotonic()
        patch = {"spec": {"optimization": {"quantization": "none"}}}
        cluster.kubectl("patch", "edgemodel", "digits", "-n", namespace, "--type=merge", "-p", json.dumps(patch))

        def new_variant():
            v = _ready_variant(cluster, namespace, profile)
            return v if v and v["digest"] != old_digest else None

        variant = wait_for(new_variant, 300, 2, "the new variant compiled")
        pod = wait_for(lambda: serving_pod(cluster, namespace, profile, variant["digest"]), 180, 0.5,
                       "the real pod rolled to the new digest")
        note("model update: patch -> real pod serving the new digest (s)", time.monotonic() - started)
        seen = poller.tally.sent
        wait_for(lambda: poller.tally.sent >= seen + 50, 60, 0.2, "50 more requests after the rollout")
    finally:
        poller.stop.set()
        poller.join(30)
    tally = poller.tally
    print(f"[real-node] rollout poller: {tally.sent} sent, {tally.ok} answered, {tally.failed} failed, "
          f"digests seen {sorted(tally.digests)}")
    assert pod["metadata"]["uid"] != old["metadata"]["uid"]
    assert tally.digests == {old_digest.split(":")[1][:12], variant["digest"].split(":")[1][:12]}
    served["variant"] = variant
    assert tally.failed == 0, f"{tally.failed} of {tally.sent} requests failed: {tally.failures[:5]}"
