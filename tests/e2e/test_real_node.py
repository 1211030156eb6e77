"""End to end on the dev cluster's real node: the chart's operator runs as a real pod (restricted Pod Security),
compiles the quickstart in a compile Job, and the class the real node belongs to serves it from a real runtime
pod: fetched into the node's hostPath cache, digest-checked, probed by the kubelet, reached through its pod IP
and its Service. Skipped, with the reason, where there is no real node or the images are not built.

Traffic goes only to the pods and Service this module creates (on the node's bridge) and to a runtime process
it starts on loopback; every loop is bounded in count and time. Timings are printed (`pytest -s`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kube_helpers import get, is_ready, items, wait_for
from operator_helpers import quickstart_into
from real_node_helpers import (
    OPERATOR_NAMESPACE,
    TAINT_KEY,
    Tally,
    chart_values,
    eval_set,
    events_for,
    infer_one,
    install_operator,
    operator_pod,
    real_node_class,
    real_pods,
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
def namespace(cluster):
    """The module's namespace: the only one the chart's operator watches (other tests on the shared cluster run
    operators of their own)."""
    name = f"rn-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def chart_operator(cluster, real_node, namespace, tmp_path_factory):
    """The chart installed with the operator as a real pod on the real node (compile executor: job)."""
    cluster.kubectl("delete", "hardwareprofile", RECREATED, "--ignore-not-found")
    # a repository of this run's own: the compile store holds no earlier run's compile, so the Job runs
    values = {**chart_values(cluster, real_node, repository=f"edgefleet-e2e/{namespace}"),
              "watchNamespaces": [namespace]}
    seconds = install_operator(cluster, values, tmp_path_factory.mktemp("chart"))
    note("helm install -> operator Ready (s)", seconds)
    yield real_node
    uninstall_operator(cluster)
    # the session's other tests expect the built-in profiles as the files say (the operator pinned images)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PROFILES))
    out = Path(__file__).resolve().parents[2] / "build" / "real-node-timings.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(TIMINGS, indent=2))


@pytest.fixture(scope="module")
def served(cluster, chart_operator, namespace):
    """The quickstart in the module's namespace, its real-node class served by a real pod."""
    profile = real_node_class(cluster)
    with tolerating_real_node(cluster, profile):
        started = time.monotonic()
        quickstart_into(cluster, namespace)
        _real_node_only(cluster, namespace)
        variant = wait_for(lambda: _ready_variant(cluster, namespace, profile), 420, 2,
                           f"the {profile} variant compiled by the compile Job")
        try:
            pod = wait_for(lambda: serving_pod(cluster, namespace, profile, variant["digest"]), 180, 1,
                           f"a Ready {profile} pod on the real node serving {variant['digest'][:19]}")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{_what_happened(cluster, namespace, profile)}") from None
        note("quickstart apply -> real pod serving (s)", time.monotonic() - started)
        yield {"namespace": namespace, "profile": profile, "variant": variant, "pod": pod, "first": variant}


def _real_node_only(cluster, namespace: str) -> None:
    """The module's fleet is the real node alone (kwok nodes cannot show a failing fetch), set before the first
    pods: narrowing the nodes later rolls the node's pod once more, and with maxSurge the DaemonSet controller
    (v1.36) has left the old pod beside a Ready new one for minutes (seen on this cluster)."""
    patch = {"spec": {"nodeSelector": {"matchLabels": {TAINT_KEY: "true"}}}}
    cluster.kubectl("patch", "edgedeployment", "digits", "-n", namespace, "--type=merge", "-p", json.dumps(patch))


def _what_happened(cluster, namespace: str, profile: str) -> str:
    """The class's pods, its status message and the namespace's last events, for a failure message."""
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", "-l", f"edgefleet.io/profile={profile}",
                           check=False).stdout
    events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    tolerations = get(cluster, None, "hardwareprofile", profile)["spec"].get("tolerations")
    return (f"pods:\n{pods}\nclass message: {_class_message(cluster, namespace, profile)!r}\n"
            f"profile tolerations: {tolerations}\nlast events:\n{chr(10).join(events.splitlines()[-15:])}")


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
    coral = wait_for(lambda: _ready_variant(cluster, namespace, "coral-edgetpu"), 60, 2, "the coral variant")
    assert coral["format"] == "tflite", coral  # converted from the ONNX source by the compile Job (onnx2tf)
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
    envelope = json.loads(open_store(ref, True).get(ref, ""))  # sealed by the Job (edgefleet_runtime.sealed)
    return json.loads(envelope["report"])["variants"][profile]


def _host_process_score(cluster, variant: dict, x, y):
    """The baseline: the same variant served by edgefleet-runtime on this machine (loopback)."""
    from edgefleet_dev.net import free_port

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
        # the fleet is the real node alone: recompile its class only (the coral .tflite was proven by `served`)
        patch = {"spec": {"optimization": {"quantization": "none"}, "targetProfiles": {"names": [profile]}}}
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


# Bad input on the real node: the node's new pod (rollout.maxSurge 1) cannot start; the EdgeDeployment says why
# (class message + Degraded reason with the fix + one Warning event) while the old pod keeps serving.

def _degraded(cluster, namespace: str) -> dict:
    conds = get(cluster, namespace, "edgedeployment", "digits").get("status", {}).get("conditions", [])
    return next((c for c in conds if c["type"] == "Degraded"), {})


def _degraded_with(cluster, namespace: str, reason: str):
    def check():
        cond = _degraded(cluster, namespace)
        return cond if cond.get("status") == "True" and cond.get("reason") == reason else None
    return check


def _warnings(cluster, namespace: str, reason: str) -> list[dict]:
    return [e for e in events_for(cluster, namespace, "digits")
            if e["involvedObject"]["kind"] == "EdgeDeployment" and e["type"] == "Warning" and e["reason"] == reason]


def _surging(cluster, namespace: str) -> None:
    """The node's new pod starts beside the old one (the fleet is the real node alone since `served`)."""
    patch = {"spec": {"rollout": {"maxSurge": 1}}}
    cluster.kubectl("patch", "edgedeployment", "digits", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    profile = real_node_class(cluster)

    def settled():  # the template change rolls the node's pod once: done when one updated pod is Ready
        daemonsets = items(cluster, namespace, "daemonsets")
        if [d["metadata"]["name"] for d in daemonsets] != [f"digits-{profile}"]:
            return False
        ds = daemonsets[0]
        st = ds.get("status", {})
        return (st.get("observedGeneration") == ds["metadata"]["generation"]
                and st.get("desiredNumberScheduled") == st.get("updatedNumberScheduled") == st.get("numberReady") == 1
                and len(real_pods(cluster, namespace, profile)) == 1)

    def state() -> str:
        sets = {d["metadata"]["name"]: d.get("status", {}) for d in items(cluster, namespace, "daemonsets")}
        pods = [(p["metadata"]["name"], p["spec"].get("nodeName"), p.get("status", {}).get("phase"))
                for p in items(cluster, namespace, "pods")]
        return (f"the real node's class alone, its one pod updated and Ready; daemonsets {sets}; pods {pods}; "
                f"class message {_class_message(cluster, namespace, profile)!r}")

    wait_for(settled, 120, 0.5, state)


def _model_ref(cluster, namespace: str, model: str) -> None:
    patch = {"spec": {"modelRef": {"name": model}}}
    cluster.kubectl("patch", "edgedeployment", "digits", "-n", namespace, "--type=merge", "-p", json.dumps(patch))


def _healthy_again(cluster, served, old: dict) -> None:
    """The bad input is gone: Degraded False and the same old pod alone on the node."""
    namespace = served["namespace"]
    wait_for(lambda: _degraded(cluster, namespace).get("status") == "False", 90, 1, "Degraded to clear")
    pod = wait_for(lambda: serving_pod(cluster, namespace, served["profile"], served["variant"]["digest"]), 90, 1,
                   "the old pod alone on the node again")
    assert pod["metadata"]["uid"] == old["metadata"]["uid"], "the old pod was replaced"


@contextlib.contextmanager
def _polling(cluster, namespace: str):
    """A client through the Service for the duration; every request must be answered by the old variant."""
    poller = Poller(get(cluster, namespace, "service", "digits")["spec"]["clusterIP"])
    poller.start()
    try:
        yield poller
    finally:
        poller.stop.set()
        poller.join(30)
    tally = poller.tally
    print(f"[real-node] bad input poller: {tally.sent} sent, {tally.ok} answered, {tally.failed} failed")
    assert tally.sent > 50 and tally.failed == 0, f"{tally.failed} of {tally.sent} failed: {tally.failures[:5]}"


@pytest.fixture(scope="module")
def other_variant(cluster, served):
    """A second EdgeModel, digits-b, compiled (registry up) for the real node's class only, at another precision
    than the one served: an EdgeDeployment switched to it must fetch a variant the node cache does not hold."""
    namespace, profile = served["namespace"], served["profile"]
    quantization = "static-int8" if served["variant"].get("precision") == "fp32" else "none"
    model = get(cluster, namespace, "edgemodel", "digits")
    spec = {**model["spec"], "optimization": {**model["spec"]["optimization"], "quantization": quantization,
                                              "selection": "host"},  # no benchmark Job: the compile host's pick
            "targetProfiles": {"names": [profile]}}
    doc = {"apiVersion": model["apiVersion"], "kind": "EdgeModel",
           "metadata": {"name": "digits-b", "namespace": namespace}, "spec": spec}
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(doc))
    variant = wait_for(lambda: _ready_variant_of(cluster, namespace, "digits-b", profile), 420, 2,
                       f"digits-b's {profile} variant ({quantization})")
    assert variant["digest"] != served["variant"]["digest"]
    (Path(cluster.real_node["nodeCache"]) / "sha256" / variant["digest"].split(":")[1]).unlink(missing_ok=True)
    return variant


def _ready_variant_of(cluster, namespace: str, model: str, profile: str) -> dict | None:
    variants = get(cluster, namespace, "edgemodel", model).get("status", {}).get("variants", [])
    mine = next((v for v in variants if v["profile"] == profile), None)
    if mine and mine.get("state") == "Failed":
        raise AssertionError(f"{model}'s {profile} variant failed: {mine}")
    return mine if mine and mine.get("state") == "Ready" else None


@contextlib.contextmanager
def _runtime_image(cluster, profile: str, image: str):
    """The class's HardwareProfile pointing at `image`, restored afterwards (every EdgeDeployment of the class
    sees it: keep the window short)."""
    before = get(cluster, None, "hardwareprofile", profile)["spec"]["runtimeImage"]
    patch = [{"op": "replace", "path": "/spec/runtimeImage", "value": image}]
    cluster.kubectl("patch", "hardwareprofile", profile, "--type=json", "-p", json.dumps(patch))
    try:
        yield
    finally:
        restore = [{"op": "replace", "path": "/spec/runtimeImage", "value": before}]
        cluster.kubectl("patch", "hardwareprofile", profile, "--type=json", "-p", json.dumps(restore), check=False)


def test_unpullable_runtime_image_degrades_the_class_with_the_fix_while_the_old_pod_serves(cluster, served):
    namespace, profile = served["namespace"], served["profile"]
    others = {p["metadata"]["namespace"] for p in items(cluster, None, "pods", "-A", "-l",
                                                     f"edgefleet.io/profile={profile}")
              if p["spec"].get("nodeName") == cluster.real_node["name"] and p["metadata"]["namespace"] != namespace
              and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")}  # finished bench Job pods
    if others:
        pytest.skip(f"other tests run {profile} pods on the real node (namespaces {sorted(others)}): the class's "
                    "runtimeImage is cluster-wide, changing it would break them; runs when the node is this module's")
    _surging(cluster, namespace)
    old = _current(cluster, served)
    image = f"ghcr.io/edgefleet/runtime-missing:{uuid.uuid4().hex[:8]}"
    with _polling(cluster, namespace):
        with _runtime_image(cluster, profile, image):
            started = time.monotonic()
            cond = wait_for(_degraded_with(cluster, namespace, "ImagePullFailed"), 120, 1,
                            "Degraded ImagePullFailed")
            note("bad input: unpullable image -> Degraded (s)", time.monotonic() - started)
            assert f"runtimeImage of HardwareProfile {profile} ({image})" in cond["message"], cond["message"]
            assert image in _class_message(cluster, namespace, profile)
            wait_for(lambda: _warnings(cluster, namespace, "ImagePullFailed"), 30, 1, "a Warning event")
            assert is_ready(get(cluster, namespace, "pod", old["metadata"]["name"]))
        _healthy_again(cluster, served, old)


def test_variant_whose_digest_does_not_match_is_refused_by_the_node_with_the_fix_while_the_old_pod_serves(
        cluster, served, other_variant):
    """The registry serves other bytes (same size) under digits-b's variant: the node's fetch refuses them."""
    namespace, profile = served["namespace"], served["profile"]
    _surging(cluster, namespace)
    old = _current(cluster, served)
    hexdigest = other_variant["digest"].split(":")[1]
    blob = cluster.state / "registry" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexdigest[:2] / hexdigest
    original = (blob / "data").read_bytes()
    with _polling(cluster, namespace):
        (blob / "data").write_bytes(original[:-16] + b"\0" * 16)
        try:
            started = time.monotonic()
            _model_ref(cluster, namespace, "digits-b")
            cond = wait_for(_degraded_with(cluster, namespace, "VariantDigestMismatch"), 120, 1,
                            "Degraded VariantDigestMismatch")
            note("bad input: digest mismatch -> Degraded (s)", time.monotonic() - started)
            assert f"expected {other_variant['digest']}, downloaded bytes have sha256:" in cond["message"]
            assert "publish the variant again" in cond["message"]
            assert "init container fetch-model exited 3" in _class_message(cluster, namespace, profile)
            wait_for(lambda: _warnings(cluster, namespace, "VariantDigestMismatch"), 30, 1, "a Warning event")
            assert not (Path(cluster.real_node["nodeCache"]) / "sha256" / hexdigest).exists(), "refused bytes cached"
            assert is_ready(get(cluster, namespace, "pod", old["metadata"]["name"]))
            _model_ref(cluster, namespace, "digits")
        finally:
            (blob / "data").write_bytes(original)
        _healthy_again(cluster, served, old)


def test_registry_down_while_a_new_variant_must_be_fetched_says_registry_unreachable_while_the_old_pod_serves(
        cluster, served, other_variant):
    namespace, profile = served["namespace"], served["profile"]
    _surging(cluster, namespace)
    old = _current(cluster, served)
    with _polling(cluster, namespace), registry_stopped(cluster):
        started = time.monotonic()
        _model_ref(cluster, namespace, "digits-b")
        cond = wait_for(_degraded_with(cluster, namespace, "RegistryUnreachable"), 150, 1,
                        "Degraded RegistryUnreachable")
        note("bad input: registry down -> Degraded RegistryUnreachable (s)", time.monotonic() - started)
        assert f"registry {cluster.pod_registry} unreachable" in cond["message"], cond["message"]
        assert "cannot reach the artifact store" in cond["message"]
        wait_for(lambda: _warnings(cluster, namespace, "RegistryUnreachable"), 30, 1, "a Warning event")
        new = next(p for p in real_pods(cluster, namespace, profile) if p["metadata"]["uid"] != old["metadata"]["uid"])
        log = cluster.kubectl("logs", "-n", namespace, new["metadata"]["name"], "-c", "fetch-model", "--previous",
                              check=False).stdout
        assert log.count("registry unreachable, retrying") >= 2, log[-800:]
        assert is_ready(get(cluster, namespace, "pod", old["metadata"]["name"]))
        _model_ref(cluster, namespace, "digits")
    _healthy_again(cluster, served, old)


def test_operator_pod_killed_mid_rollout_converges_without_duplicate_or_orphaned_pods(cluster, served,
                                                                                      other_variant):
    """The EdgeDeployment moves to digits-b (surge); once the DaemonSet carries the new variant and the node's new
    pod is starting, the chart's operator pod is deleted with grace 0. The Deployment's new operator pod must
    finish the job: one DaemonSet, one pod on the node serving the new digest, none orphaned, status converged."""
    namespace, profile = served["namespace"], served["profile"]
    _surging(cluster, namespace)
    _current(cluster, served)
    killed = operator_pod(cluster)
    assert killed is not None
    digest = other_variant["digest"]
    _model_ref(cluster, namespace, "digits-b")
    wait_for(lambda: get(cluster, namespace, "daemonset", f"digits-{profile}")["spec"]["template"]["metadata"][
        "annotations"].get("edgefleet.io/variant-digest") == digest, 60, 0.2, "the DaemonSet to carry digits-b")
    starting = len(real_pods(cluster, namespace, profile))
    cluster.kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, killed["metadata"]["name"], "--grace-period=0",
                    "--force", "--wait=false")
    started = time.monotonic()

    def new_operator():
        pod = operator_pod(cluster)
        return pod if pod and pod["metadata"]["uid"] != killed["metadata"]["uid"] else None

    wait_for(new_operator, 180, 0.5, "a new operator pod Ready")
    note("operator killed mid-rollout -> new operator pod Ready (s)", time.monotonic() - started)

    def converged():
        ed = get(cluster, namespace, "edgedeployment", "digits")
        status = ed.get("status", {})
        conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
        mine = next((c for c in status.get("classes", []) if c["profile"] == profile), {})
        return (status.get("observedGeneration") == ed["metadata"]["generation"] and mine.get("digest") == digest
                and (mine["desired"], mine["ready"], mine["updated"]) == (1, 1, 1)
                and conds.get("Available") == "True" and conds.get("Degraded") == "False"
                and serving_pod(cluster, namespace, profile, digest))

    wait_for(converged, 180, 1, "the EdgeDeployment to converge on digits-b")
    note("operator killed mid-rollout -> converged (s)", time.monotonic() - started)
    time.sleep(3)  # a duplicate would be created about now: count after a moment more
    daemonsets = [d["metadata"]["name"] for d in items(cluster, namespace, "daemonsets")]
    pods = [p for p in items(cluster, namespace, "pods") if not p["metadata"].get("deletionTimestamp")]
    owners = {p["metadata"]["name"]: [(o["kind"], o["name"]) for o in p["metadata"].get("ownerReferences", [])]
              for p in pods}
    print(f"[real-node] after the operator kill: {len(pods)} pods (were {starting} on the node mid-rollout), "
          f"daemonsets {daemonsets}")
    assert daemonsets == [f"digits-{profile}"], daemonsets
    assert list(owners.values()) == [[("DaemonSet", f"digits-{profile}")]], owners  # one pod, not orphaned
    assert pods[0]["spec"]["nodeName"] == cluster.real_node["name"]
    tally = score(serving_pod(cluster, namespace, profile, digest)["status"]["podIP"], 8080, *eval_set(20),
                  model="digits-b")
    assert tally.failed == 0 and tally.digests == {digest.split(":")[1][:12]}, tally.failures[:3]


def _compile_jobs(cluster, namespace: str) -> set[str]:
    return {j["metadata"]["name"] for j in items(cluster, OPERATOR_NAMESPACE, "jobs", "-l",
                                                  f"edgefleet.io/model-namespace={namespace}")}


def test_quickstart_applied_again_serves_from_the_stored_reports_and_the_node_cache(cluster, served):
    """Deleted and applied again (a GitOps re-sync, a restored namespace): the compile and the on-target benchmark
    are read back from the artifact store (their reports are keyed by what they measured), the variant from the
    node cache; no Job runs. Last in the module: it replaces the module's deployment."""
    namespace, profile, first = served["namespace"], served["profile"], served["first"]
    for kind, name in (("edgedeployment", "digits"), ("edgemodel", "digits"), ("edgemodel", "digits-b")):
        cluster.kubectl("delete", kind, name, "-n", namespace, "--ignore-not-found")
    wait_for(lambda: not real_pods(cluster, namespace, profile), 120, 1, "the class's pods gone")
    jobs = _compile_jobs(cluster, namespace)
    started = time.monotonic()
    quickstart_into(cluster, namespace)
    _real_node_only(cluster, namespace)
    pod = wait_for(lambda: serving_pod(cluster, namespace, profile, first["digest"]), 180, 0.5,
                   lambda: f"the first variant served again\n{_what_happened(cluster, namespace, profile)}")
    note("quickstart applied again (reports stored) -> real pod serving (s)", time.monotonic() - started)
    assert _compile_jobs(cluster, namespace) <= jobs, "a compile Job ran again"
    tally = score(pod["status"]["podIP"], 8080, *eval_set(50))
    assert tally.failed == 0 and tally.digests == {first["digest"].split(":")[1][:12]}, tally.failures[:3]


ATTACKER = Path(__file__).resolve().parent / "attacker_push.py"


def _attack_from_the_node(cluster, repository: str) -> dict:
    """A pod on the real node, in a namespace with no edgefleet rights and no registry credentials, overwrites
    every tag of the module's repository (attacker_push.py); returns what it overwrote."""
    ns = f"rn-attacker-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    try:
        cluster.kubectl("create", "configmap", "attack", "-n", ns, f"--from-file=attack.py={ATTACKER}")
        image = get(cluster, None, "hardwareprofile", real_node_class(cluster))["spec"]["runtimeImage"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "attacker", "namespace": ns},
               "spec": {"nodeName": cluster.real_node["name"], "restartPolicy": "Never",
                        "automountServiceAccountToken": False,
                        "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                        "containers": [{"name": "attack", "image": image, "command": ["/usr/bin/python3.11"],
                                        "args": ["/attack/attack.py", cluster.pod_registry, repository],
                                        "volumeMounts": [{"name": "attack", "mountPath": "/attack"}]}],
                        "volumes": [{"name": "attack", "configMap": {"name": "attack"}}]}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        phase = wait_for(lambda: get(cluster, ns, "pod", "attacker").get("status", {}).get("phase") in (
            "Succeeded", "Failed") and get(cluster, ns, "pod", "attacker")["status"]["phase"], 120, 1,
            "the attacker pod to finish")
        log = cluster.kubectl("logs", "-n", ns, "attacker", check=False).stdout
        assert phase == "Succeeded", f"the attacker pod failed: {log[-2000:]}"
        return json.loads(log.strip().splitlines()[-1])
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_boundary_report_and_variant_tags_overwritten_from_a_pod_on_the_node_are_refused_and_the_fleet_serves_on(
        cluster, served):
    """The attack of issue 30 on the real node: a pod with no rights tries to overwrite the report and variant tags
    and the registry refuses every push (token authentication). The same overwrite with push rights then replaces
    the compile/bench report tags (compiled-<key>, <job>-report) with reports naming a forged digest, and every
    variant tag with forged bytes.
    The pod serving keeps answering correctly throughout. Once the Jobs are gone (their TTL), the quickstart applied
    again refuses every forged report with a Warning event, runs its Jobs again and serves a genuine variant, never
    the forged digest. Last in the module: it replaces the module's deployment."""
    namespace, profile = served["namespace"], served["profile"]
    pod = wait_for(lambda: next((p for p in real_pods(cluster, namespace, profile) if is_ready(p)), None), 120, 1,
                   "a Ready pod of the class")
    serving = pod["metadata"]["annotations"]["edgefleet.io/variant-digest"]
    x, y = eval_set(100)
    blocked = _attack_from_the_node(cluster, f"edgefleet-e2e/{namespace}")
    print(f"[real-node] from the node: {blocked['tags']} tags read, {blocked['refused']} pushes refused")
    # the registry itself refuses the pod: reading is anonymous, pushing needs a token the pod cannot get
    assert blocked["tags"] and not blocked["reports"] and not blocked["variants"], blocked
    assert blocked["refused"] == blocked["tags"] + 1, blocked  # every tag and the forged blob
    # defence in depth: the same overwrite with push rights (a leaked credential; here this machine, which the dev
    # registry trusts) reaches the store, and the operator must still refuse it
    attack = subprocess.run([sys.executable, str(ATTACKER), cluster.registry, f"edgefleet-e2e/{namespace}"],
                            capture_output=True, text=True, timeout=300, check=True)
    done = json.loads(attack.stdout.strip().splitlines()[-1])
    print(f"[real-node] with push rights: overwrote {len(done['reports'])} report tags, "
          f"{len(done['variants'])} variant tags")
    assert any(t.startswith("compiled-") for t in done["reports"]) and done["variants"], done
    during = score(pod["status"]["podIP"], 8080, x, y)
    assert during.failed == 0 and during.digests == {serving.split(":")[1][:12]}, during.failures[:3]
    assert during.top1 > 0.9, during.top1

    # the Jobs' TTL elapsed (as it does in an hour): their reports are read back from the forged tags
    cluster.kubectl("delete", "jobs", "-n", OPERATOR_NAMESPACE, "-l", f"edgefleet.io/model-namespace={namespace}",
                    "--wait=true", "--timeout=120s")
    jobs = _compile_jobs(cluster, namespace)
    for kind, name in (("edgedeployment", "digits"), ("edgemodel", "digits"), ("edgemodel", "digits-b")):
        cluster.kubectl("delete", kind, name, "-n", namespace, "--ignore-not-found")
    wait_for(lambda: not real_pods(cluster, namespace, profile), 120, 1, "the class's pods gone")
    quickstart_into(cluster, namespace)
    _real_node_only(cluster, namespace)
    variant = wait_for(lambda: _ready_variant(cluster, namespace, profile), 420, 2,
                       lambda: f"a {profile} variant compiled again\n{_what_happened(cluster, namespace, profile)}")
    assert variant["digest"] != done["forgedDigest"]
    refused = [e for e in events_for(cluster, namespace, "digits")
               if e["involvedObject"]["kind"] == "EdgeModel" and e["reason"] == "ReportRejected"]
    assert refused and all("refused" in e["message"] for e in refused), refused
    assert _compile_jobs(cluster, namespace) - jobs and any("runs again" in e["message"] for e in refused), refused
    pod = wait_for(lambda: serving_pod(cluster, namespace, profile, variant["digest"]), 180, 1,
                   lambda: f"the genuine variant served\n{_what_happened(cluster, namespace, profile)}")
    after = score(pod["status"]["podIP"], 8080, x, y)
    assert after.failed == 0 and after.top1 > 0.9, (after.failures[:3], after.top1)
    assert done["forgedDigest"].split(":")[1][:12] not in after.digests
