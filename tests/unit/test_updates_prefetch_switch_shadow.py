"""rollout.prefetch / activation / shadow and delta downloads on the operator side (reconcile.updates): the pure
plan from the pods' reports, the rendered pod template, and the reconciler against the in-memory fake writer
(the pods' /metrics come from the runtime's real metric objects, rendered as Prometheus text)."""

from __future__ import annotations

import json
import time

import pytest
from edgefleet.api import EdgeDeployment, Variant, builtin_profiles
from edgefleet.reconcile import World, reconcile_deployment
from edgefleet.reconcile import deployment as deployment_module
from edgefleet.reconcile.updates import PodControl, Ref, parse_metrics, plan_update
from edgefleet.render import render_class
from edgefleet.render.workload import ACTIVE_ANNOTATION, PREFETCH_ANNOTATION, SHADOW_ANNOTATION, TEMPLATE_HASH
from edgefleet.settings import Settings
from fake_kube import FakeKube
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from pydantic import ValidationError

NS = "shop"
OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
PINNED = Ref(OLD, f"oci://registry.local/m@{OLD}")
TARGET = Ref(NEW, f"oci://registry.local/m@{NEW}")
NOW = 1_000_000.0
PROFILES = {p.metadata["name"]: p for p in builtin_profiles()}


def spec(runtime: dict | None = None, **rollout) -> EdgeDeployment:
    return EdgeDeployment.model_validate({"metadata": {"name": "digits", "namespace": NS, "uid": "u1"},
                                          "spec": {"modelRef": {"name": "digits"}, "rollout": rollout,
                                                   "runtime": runtime or {}}})


def pod(i: int, *states: tuple[str, str, str], shadow: dict | None = None, ready: bool = True,
        annotations: dict | None = None, reasons: dict | None = None) -> PodControl:
    return PodControl(f"p{i}", f"node-{i}", ready, dict(annotations or {}), {(k, d): s for k, d, s in states},
                      dict(reasons or {}), dict(shadow or {}))


def fetched(i: int, **kw) -> PodControl:
    return pod(i, ("prefetch", NEW, "done"), **kw)


def active_patches(plan) -> dict[str, str | None]:
    return {p: a[ACTIVE_ANNOTATION] for p, a in plan.patches.items() if ACTIVE_ANNOTATION in a}


# ---------------------------------------------------------------- API


@pytest.mark.parametrize(("rollout", "words"), [
    ({"shadow": {}}, "rollout.shadow needs rollout.prefetch"),
    ({"activation": {"manual": True}}, "rollout.activation needs rollout.prefetch"),
    ({"prefetch": {}, "activation": {"approvedDigest": NEW}}, "approvedDigest only applies with manual: true"),
    ({"prefetch": {}, "shadow": {"minAgreement": 1.5}}, "min_agreement"),
])
def test_prefetch_and_shadow_spec_errors_name_the_field_and_the_fix(rollout, words):
    with pytest.raises(ValidationError) as err:
        spec(**rollout)
    assert words in str(err.value).replace("minAgreement", "min_agreement") or words in str(err.value)


def test_prefetch_needs_per_node_and_one_worker():
    for extra, words in (({"mode": "Replicas", "replicas": 2}, "needs mode PerNode"),
                         ({"runtime": {"workers": 2}}, "runtime.workers above 1")):
        with pytest.raises(ValidationError, match=words):
            EdgeDeployment.model_validate({"metadata": {"name": "d", "namespace": NS}, "spec": {
                "modelRef": {"name": "m"}, "rollout": {"prefetch": {}}, **extra}})


# ---------------------------------------------------------------- render


def _render(ed: EdgeDeployment, digest: str, deltas=None) -> dict:
    v = Variant(profile="cpu-arm64", state="Ready", digest=digest, artifact=f"oci://registry.local/m@{digest}")
    return render_class(ed, PROFILES["cpu-arm64"], v, list(PROFILES.values()), "/var/lib/edgefleet/cache",
                        deltas=deltas)


def _hash(manifest: dict) -> str:
    return manifest["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH]


def test_switch_in_place_template_hash_leaves_the_variant_out():
    """In place a new variant must not look like a new pod template (that restarts pods); the restart path and
    deployments without prefetch keep a hash that changes with the variant."""
    ed = spec(prefetch={})
    old, new = _render(ed, OLD), _render(ed, NEW)
    assert _hash(old) == _hash(new)
    assert old["spec"]["template"] != new["spec"]["template"]  # the template still names the variant it starts
    restart = spec(prefetch={}, activation={"inPlace": False})
    assert _hash(_render(restart, OLD)) != _hash(_render(restart, NEW))
    assert _hash(_render(spec(), OLD)) != _hash(_render(spec(), NEW))
    assert _hash(_render(ed, OLD)) != _hash(_render(spec(prefetch={}, runtime={"threads": 2}), OLD))


def test_switch_control_dir_is_the_downward_api_volume_the_runtime_reads():
    manifest = _render(spec(prefetch={}), OLD)
    pod_spec = manifest["spec"]["template"]["spec"]
    runtime = next(c for c in pod_spec["containers"] if c["name"] == "runtime")
    control = next(v for v in pod_spec["volumes"] if v["name"] == "control")
    files = {i["path"]: i["fieldRef"]["fieldPath"] for i in control["downwardAPI"]["items"]}
    assert files == {"active": f"metadata.annotations['{ACTIVE_ANNOTATION}']",
                     "prefetch": f"metadata.annotations['{PREFETCH_ANNOTATION}']",
                     "shadow": f"metadata.annotations['{SHADOW_ANNOTATION}']"}
    mount = next(m for m in runtime["volumeMounts"] if m["name"] == "control")
    assert f"--control-dir={mount['mountPath']}" in runtime["args"]
    cache = next(m for m in runtime["volumeMounts"] if m["name"] == "model-cache")
    assert cache["readOnly"] is False and f"--cache={cache['mountPath']}" in runtime["args"]  # prefetch writes
    assert manifest["spec"]["updateStrategy"] == {"type": "OnDelete"}
    plain = next(c for c in _render(spec(), OLD)["spec"]["template"]["spec"]["containers"] if c["name"] == "runtime")
    assert not any(a.startswith("--control-dir") for a in plain["args"])


def test_delta_flags_go_to_the_fetch_init_container():
    flag = f"base={OLD},digest=sha256:{'c' * 64},sizeBytes=10,ref=oci://registry.local/d@sha256:{'c' * 64}"
    init = next(c for c in _render(spec(), NEW, [flag])["spec"]["template"]["spec"]["initContainers"]
                if c["name"] == "fetch-model")
    assert f"--delta={flag}" in init["args"]


def test_prefetch_runtime_control_files_are_read_from_a_kubelet_style_downward_volume(tmp_path):
    """The kubelet writes a downward-API volume as symlinks into a ..data folder; the runtime reads them."""
    from edgefleet_runtime import control

    data = tmp_path / "..2026_12_07"
    data.mkdir()
    (data / "active").write_text(NEW)
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "active").symlink_to("..data/active")
    assert control.parse_active(control.read_file(tmp_path / "active")) == NEW
    assert control.read_file(tmp_path / "shadow") == ""  # an annotation not set: nothing asked


# ---------------------------------------------------------------- metrics


def test_prefetch_state_and_reason_parsed_from_the_runtime_metrics(tmp_path):
    """The runtime's own Control exports a state and its reason; the operator's parser reads both, and the
    shadow counters of the runtime's ShadowMetrics."""
    from edgefleet_runtime.control import Control
    from edgefleet_runtime.shadow import ShadowMetrics

    registry = CollectorRegistry()
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "active").write_text(NEW)

    class Slot:
        current = None

    c = Control(tmp_path / "control", tmp_path / "cache", Slot(), registry)
    c.poll()  # NEW is not in the cache: missing, with the reason
    m = ShadowMetrics(registry)
    m.samples.labels(NEW, "probs").inc(40)
    m.top1.labels(NEW, "probs").inc(30)
    m.cosine.labels(NEW, "probs").inc(38.0)
    m.samples.labels(OLD, "probs").inc(7)  # another candidate: not counted
    states, reasons, shadow = parse_metrics(generate_latest(registry).decode(), NEW)
    assert states[("active", NEW)] == "missing"
    assert "prefetch it first" in reasons[("active", NEW)]
    assert shadow == {"probs": [40.0, 30.0, 38.0]}


# ---------------------------------------------------------------- the plan


def test_prefetch_every_node_before_any_activation():
    ed = spec(prefetch={}, canaryPercent=25)
    pods = [fetched(0), fetched(1), pod(2, ("prefetch", NEW, "pending")), pod(3)]
    plan = plan_update(ed, PINNED, TARGET, ["DELTA"], pods, {}, NOW)
    assert set(plan.patches) == {"p0", "p1", "p2", "p3"}
    order = json.loads(plan.patches["p0"][PREFETCH_ANNOTATION])
    assert order == {"ref": TARGET.artifact, "digest": NEW, "deltas": ["DELTA"]}
    assert active_patches(plan) == {}
    assert plan.prefetch == {"digest": NEW, "done": 2, "pending": 2, "failed": 0, "failures": []}
    assert plan.progress == "prefetching 2/4" and not plan.complete


def test_switch_in_place_wave_by_wave_until_complete():
    ed = spec(prefetch={}, canaryPercent=25)
    pods = [fetched(i) for i in range(4)]
    plan = plan_update(ed, PINNED, TARGET, [], pods, {}, NOW)
    assert active_patches(plan) == {"p0": NEW}  # the first wave: 25 % of 4 nodes
    assert plan.progress.startswith("wave 1/2")
    pods[0] = pod(0, ("prefetch", NEW, "done"), ("active", NEW, "done"), annotations={ACTIVE_ANNOTATION: NEW})
    plan = plan_update(ed, PINNED, TARGET, [], pods, plan.record, NOW + 1)
    assert active_patches(plan) == {"p1": NEW}  # maxUnavailable (25 %: 1) bounds the switches in flight
    pods[1] = pod(1, ("prefetch", NEW, "done"), ("active", NEW, "pending"), annotations={ACTIVE_ANNOTATION: NEW})
    plan = plan_update(ed, PINNED, TARGET, [], pods, plan.record, NOW + 2)
    assert active_patches(plan) == {}  # p1 (told already) is still loading: nobody else is told yet
    pods[1] = pod(1, ("prefetch", NEW, "done"), ("active", NEW, "done"), annotations={ACTIVE_ANNOTATION: NEW})
    wide = spec(prefetch={}, canaryPercent=25, maxUnavailable="100%")
    plan = plan_update(wide, PINNED, TARGET, [], pods, plan.record, NOW + 3)
    assert active_patches(plan) == {"p2": NEW, "p3": NEW}  # the pods told keep their order (no patch)
    done = [pod(i, ("prefetch", NEW, "done"), ("active", NEW, "done"), annotations={
        ACTIVE_ANNOTATION: NEW, PREFETCH_ANNOTATION: plan.patches["p1"].get(PREFETCH_ANNOTATION) or ""})
        for i in range(4)]
    plan = plan_update(ed, PINNED, TARGET, [], done, plan.record, NOW + 2)
    assert plan.complete and plan.progress == "complete" and plan.problem is None


def test_prefetch_deadline_goes_on_with_the_nodes_that_hold_it_and_names_the_others():
    ed = spec(prefetch={"deadlineSeconds": 60})
    why = "URLError: [Errno 111] Connection refused"
    pods = [fetched(0), fetched(1), pod(2, ("prefetch", NEW, "failed"), reasons={("prefetch", NEW): why})]
    waiting = plan_update(ed, PINNED, TARGET, [], pods, {}, NOW)
    assert active_patches(waiting) == {} and "node-2: " + why in (waiting.waiting or "")
    plan = plan_update(ed, PINNED, TARGET, [], pods, waiting.record, NOW + 61)
    assert active_patches(plan) == {"p0": NEW}  # never the node without the variant (one switch at a time)
    pods[0] = pod(0, ("prefetch", NEW, "done"), ("active", NEW, "done"), annotations={ACTIVE_ANNOTATION: NEW})
    plan = plan_update(ed, PINNED, TARGET, [], pods, plan.record, NOW + 62)
    assert active_patches(plan) == {"p1": NEW}
    assert plan.prefetch["failures"] == [{"node": "node-2", "reason": why}]
    assert not plan.complete and "1 nodes wait for the variant" in (plan.waiting or "")


def test_prefetch_registry_unreachable_activates_nothing_and_says_which_nodes_and_why():
    ed = spec(prefetch={"deadlineSeconds": 60})
    why = "URLError: [Errno 111] Connection refused"
    pods = [pod(i, ("prefetch", NEW, "failed"), reasons={("prefetch", NEW): why}) for i in range(3)]
    plan = plan_update(ed, PINNED, TARGET, [], pods, {"target": NEW, "since": NOW - 61}, NOW)
    assert active_patches(plan) == {}
    assert plan.problem is not None and plan.problem[0] == "PrefetchFailed"
    assert "node-0: " + why in plan.problem[1] and "deadlineSeconds 60" in plan.problem[1]
    assert plan.prefetch["failed"] == 3


def shadow_pods(samples: float, agree: float, cosine: float | None = None) -> list[PodControl]:
    counters = {"probs": [samples, agree, samples if cosine is None else cosine]}
    return [fetched(0, shadow=counters), fetched(1), fetched(2), fetched(3)]


def test_shadow_runs_on_the_first_wave_before_any_activation():
    ed = spec(prefetch={}, waves=[50, 100], shadow={"minRequests": 100, "sampleRate": 0.2})
    plan = plan_update(ed, PINNED, TARGET, [], shadow_pods(10, 10), {}, NOW)
    shadowing = {p for p, a in plan.patches.items() if a.get(SHADOW_ANNOTATION)}
    assert shadowing == {"p0", "p1"}  # 50 % of 4 nodes
    assert json.loads(plan.patches["p0"][SHADOW_ANNOTATION]) == {"digest": NEW, "sampleRate": 0.2}
    assert active_patches(plan) == {} and plan.shadow["verdict"] == "Pending"


def test_shadow_disagreement_stops_the_rollout_and_the_old_variant_keeps_serving():
    ed = spec(prefetch={}, shadow={"minRequests": 100, "minAgreement": 0.9})
    pods = shadow_pods(200, 120)
    pods[0].annotations[SHADOW_ANNOTATION] = json.dumps({"digest": NEW, "sampleRate": 0.1})
    plan = plan_update(ed, PINNED, TARGET, [], pods, {}, NOW)
    assert plan.problem is not None and plan.problem[0] == "ShadowDisagreement"
    assert "0.6 over 200 samples" in plan.problem[1] and "minAgreement 0.9" in plan.problem[1]
    assert active_patches(plan) == {}
    assert plan.patches["p0"][SHADOW_ANNOTATION] is None  # the mirror is stopped
    assert plan.shadow == {"digest": NEW, "samples": 200, "agreement": 0.6, "verdict": "Fail"}
    later = plan_update(ed, PINNED, TARGET, [], [fetched(i) for i in range(4)], plan.record, NOW + 10)
    assert later.problem == plan.problem and active_patches(later) == {}  # stopped for good, numbers kept


def test_shadow_verdict_follows_the_spec_when_min_agreement_is_lowered():
    ed = spec(prefetch={}, maxUnavailable="100%", shadow={"minRequests": 100, "minAgreement": 0.9})
    failed = plan_update(ed, PINNED, TARGET, [], shadow_pods(200, 120), {}, NOW)
    assert failed.problem[0] == "ShadowDisagreement"
    # the pods restarted (counters reset): the kept numbers still decide
    stricter = spec(prefetch={}, maxUnavailable="100%", shadow={"minRequests": 100, "minAgreement": 0.7})
    assert plan_update(stricter, PINNED, TARGET, [], shadow_pods(0, 0), failed.record, NOW).problem is not None
    relaxed = spec(prefetch={}, maxUnavailable="100%", shadow={"minRequests": 100, "minAgreement": 0.5})
    plan = plan_update(relaxed, PINNED, TARGET, [], shadow_pods(0, 0), failed.record, NOW)
    assert plan.problem is None and plan.shadow["verdict"] == "Pass"
    assert active_patches(plan) == {f"p{i}": NEW for i in range(4)}


def test_shadow_pass_then_activation_completes():
    ed = spec(prefetch={}, maxUnavailable="100%",
              shadow={"minRequests": 100, "minAgreement": 0.9, "agreement": "cosine"})
    plan = plan_update(ed, PINNED, TARGET, [], shadow_pods(200, 10, cosine=196.0), {}, NOW)
    assert plan.shadow["verdict"] == "Pass" and plan.problem is None  # cosine 0.98, though top-1 is low
    assert active_patches(plan) == {f"p{i}": NEW for i in range(4)}
    assert plan_update(ed, PINNED, TARGET, [], [fetched(i) for i in range(4)], plan.record,
                       NOW + 5).shadow["verdict"] == "Pass"


def test_shadow_inconclusive_after_max_duration():
    ed = spec(prefetch={}, shadow={"minRequests": 1000, "maxDurationSeconds": 60})
    plan = plan_update(ed, PINNED, TARGET, [], shadow_pods(5, 5), {}, NOW)
    plan = plan_update(ed, PINNED, TARGET, [], shadow_pods(50, 50), plan.record, NOW + 61)
    assert plan.problem is not None and plan.problem[0] == "ShadowInconclusive"
    assert "50 of spec.rollout.shadow.minRequests 1000" in plan.problem[1]
    assert active_patches(plan) == {}
    longer = spec(prefetch={}, shadow={"minRequests": 1000, "maxDurationSeconds": 600})
    plan = plan_update(longer, PINNED, TARGET, [], shadow_pods(50, 50), plan.record, NOW + 62)
    assert plan.problem is None and plan.shadow["verdict"] == "Pending"  # the shadow phase goes on
    assert plan.patches["p0"][SHADOW_ANNOTATION]


def test_switch_held_until_after_and_manual_approval():
    pods = [fetched(i) for i in range(2)]
    later = spec(prefetch={}, maxUnavailable=2, activation={"after": "1970-01-12T14:00:00Z"})  # 1_000_800 s
    held = plan_update(later, PINNED, TARGET, [], pods, {}, NOW)
    assert active_patches(held) == {} and "activation.after" in (held.waiting or "")
    assert active_patches(plan_update(later, PINNED, TARGET, [], pods, {}, NOW + 801)) == {"p0": NEW, "p1": NEW}
    manual = spec(prefetch={}, maxUnavailable=2, activation={"manual": True})
    waiting = plan_update(manual, PINNED, TARGET, [], pods, {}, NOW)
    assert active_patches(waiting) == {} and f"approvedDigest to {NEW}" in (waiting.waiting or "")
    approved = spec(prefetch={}, maxUnavailable=2, activation={"manual": True, "approvedDigest": NEW})
    assert active_patches(plan_update(approved, PINNED, TARGET, [], pods, {}, NOW)) == {"p0": NEW, "p1": NEW}


def test_switch_wave_timeout_rolls_every_node_back_to_the_pinned_variant():
    ed = spec(prefetch={}, healthGate={"minReadySeconds": 0, "timeoutSeconds": 30})
    told = {ACTIVE_ANNOTATION: NEW}
    pods = [pod(0, ("prefetch", NEW, "done"), ("active", NEW, "failed"), annotations=told), fetched(1)]
    first = plan_update(ed, PINNED, TARGET, [], pods, {}, NOW)
    plan = plan_update(ed, PINNED, TARGET, [], pods, first.record, NOW + 31)
    assert plan.problem is not None and plan.problem[0] == "RolledBack"
    assert active_patches(plan) == {"p0": OLD}  # told to serve the pinned digest again
    paused = spec(prefetch={}, autoRollback=False, healthGate={"minReadySeconds": 0, "timeoutSeconds": 30})
    plan = plan_update(paused, PINNED, TARGET, [], pods, first.record, NOW + 31)
    assert plan.problem[0] == "RolloutFailed" and active_patches(plan) == {}


def test_switch_restart_path_renders_the_target_only_after_prefetch():
    ed = spec(prefetch={}, activation={"inPlace": False})
    assert not plan_update(ed, PINNED, TARGET, [], [fetched(0), pod(1)], {}, NOW).activate_template
    plan = plan_update(ed, PINNED, TARGET, [], [fetched(0), fetched(1)], {}, NOW)
    assert plan.activate_template and active_patches(plan) == {}
    # replaced pods start without the prefetch report: the activation is not taken back
    assert plan_update(ed, PINNED, TARGET, [], [pod(0), pod(1)], plan.record, NOW + 1).activate_template


# ---------------------------------------------------------------- the reconciler


class Node:
    """A fleet of runtime pods whose /metrics are the runtime's gauges, set by the test."""

    def __init__(self) -> None:
        self.text: dict[str, str] = {}

    def metrics(self, ip: str, port: int) -> str:
        return self.text.get(ip, "")

    def report(self, ip: str, **states: str) -> None:
        registry = CollectorRegistry()
        gauge = Gauge("edgefleet_runtime_control", "", ["kind", "digest", "state"], registry=registry)
        for kind, value in states.items():
            digest, state = value.split(" ")
            gauge.labels(kind, digest, state).set(1)
        self.text[ip] = generate_latest(registry).decode()


FLEET = {f"rpi-{i}": {"kubernetes.io/arch": "arm64"} for i in range(2)}


def model(digest: str) -> dict:
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": "digits", "namespace": NS},
            "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx"},
            "status": {"variants": [{"profile": "cpu-arm64", "state": "Ready", "format": "onnx",
                                     "precision": "fp32", "digest": digest,
                                     "artifact": f"oci://registry.local/m@{digest}"}]}}


@pytest.fixture
def fleet(monkeypatch):
    node = Node()
    monkeypatch.setattr(deployment_module, "scrape", node.metrics)
    kube = FakeKube()
    kube.add(model(OLD))
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"modelRef": {"name": "digits"}, "rollout": {"prefetch": {}, "canaryPercent": 50,
                                                                      "shadow": {"minRequests": 50}}}})
    return kube, node


def run(kube) -> float | None:
    # no delta library call reaches a registry here: the variants' refs are not in the operator's store
    return reconcile_deployment(kube, Settings(), NS, "digits", World(dict(FLEET), builtin_profiles()))


def start_pods(kube, workload: dict) -> None:
    template = workload["spec"]["template"]
    for i in range(2):
        kube.add({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"digits-rpi-{i}", "namespace": NS, "labels": template["metadata"]["labels"],
            "annotations": dict(template["metadata"]["annotations"])},
            "spec": {"nodeName": f"rpi-{i}"},
            "status": {"podIP": f"10.0.0.{i}", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    kube.set_status("DaemonSet", workload["metadata"]["name"], NS, {
        "desiredNumberScheduled": 2, "numberReady": 2, "updatedNumberScheduled": 2, "observedGeneration": 99})


def annotations(kube, i: int) -> dict:
    return kube.stored("Pod", f"digits-rpi-{i}", NS)["metadata"]["annotations"]


def test_switch_in_place_through_the_reconciler_keeps_the_pod_template(fleet):
    kube, node = fleet
    run(kube)
    workload = kube.stored("DaemonSet", "digits-cpu-arm64", NS)
    start_pods(kube, workload)
    template = json.dumps(workload["spec"]["template"], sort_keys=True)
    kube.add(model(NEW))  # a new variant is compiled

    assert run(kube) is not None  # prefetch ordered; looks again soon
    assert json.loads(annotations(kube, 0)[PREFETCH_ANNOTATION])["digest"] == NEW
    assert json.dumps(kube.stored("DaemonSet", "digits-cpu-arm64", NS)["spec"]["template"], sort_keys=True) \
        == template
    st = kube.stored("EdgeDeployment", "digits", NS)["status"]
    assert st["classes"][0]["prefetch"]["pending"] == 2 and st["classes"][0]["digest"] == OLD
    assert next(c for c in st["conditions"] if c["type"] == "Progressing")["status"] == "True"

    for i in range(2):
        node.report(f"10.0.0.{i}", prefetch=f"{NEW} done")
    run(kube)  # shadow on the first wave (one node)
    assert SHADOW_ANNOTATION in annotations(kube, 0) and SHADOW_ANNOTATION not in annotations(kube, 1)
    registry = CollectorRegistry()
    from edgefleet_runtime.shadow import ShadowMetrics

    m = ShadowMetrics(registry)
    m.samples.labels(NEW, "probs").inc(60)
    m.top1.labels(NEW, "probs").inc(60)
    node.text["10.0.0.0"] += generate_latest(registry).decode()
    run(kube)  # shadow passes: the first wave (rpi-0) is switched in place
    assert annotations(kube, 0)[ACTIVE_ANNOTATION] == NEW and ACTIVE_ANNOTATION not in annotations(kube, 1)
    assert SHADOW_ANNOTATION not in annotations(kube, 0)
    node.report("10.0.0.0", prefetch=f"{NEW} done", active=f"{NEW} done")
    run(kube)  # the second wave
    assert annotations(kube, 1)[ACTIVE_ANNOTATION] == NEW
    st = kube.stored("EdgeDeployment", "digits", NS)["status"]
    assert st["classes"][0]["rollout"].startswith("wave 2/2") and st["classes"][0]["shadow"]["verdict"] == "Pass"
    assert ("delete", "Pod", "digits-rpi-0") not in kube.calls

    for i in range(2):
        node.report(f"10.0.0.{i}", prefetch=f"{NEW} done", active=f"{NEW} done")
    run(kube)
    after = kube.stored("DaemonSet", "digits-cpu-arm64", NS)
    assert after["spec"]["template"]["metadata"]["annotations"]["edgefleet.io/variant-digest"] == NEW
    assert _hash(after) == json.loads(template)["metadata"]["annotations"][TEMPLATE_HASH]  # no restart
    assert not any(c[0] == "delete" and c[1] == "Pod" for c in kube.calls)
    st = kube.stored("EdgeDeployment", "digits", NS)["status"]
    assert st["classes"][0]["digest"] == NEW and "prefetch" not in st["classes"][0]
    run(kube)  # settled: the prefetch order is withdrawn, the active one stays
    assert PREFETCH_ANNOTATION not in annotations(kube, 0) and annotations(kube, 0)[ACTIVE_ANNOTATION] == NEW


def test_shadow_disagreement_condition_and_one_warning_event(fleet):
    kube, node = fleet
    run(kube)
    start_pods(kube, kube.stored("DaemonSet", "digits-cpu-arm64", NS))
    kube.add(model(NEW))
    for i in range(2):
        node.report(f"10.0.0.{i}", prefetch=f"{NEW} done")
    run(kube)
    registry = CollectorRegistry()
    from edgefleet_runtime.shadow import ShadowMetrics

    m = ShadowMetrics(registry)
    m.samples.labels(NEW, "probs").inc(80)
    m.top1.labels(NEW, "probs").inc(20)
    node.text["10.0.0.0"] += generate_latest(registry).decode()
    run(kube)
    run(kube)
    st = kube.stored("EdgeDeployment", "digits", NS)["status"]
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ShadowDisagreement"
    assert "0.25 over 80 samples" in degraded["message"]
    assert st["classes"][0]["shadow"]["verdict"] == "Fail" and st["classes"][0]["digest"] == OLD
    assert [e["reason"] for e in kube.warnings()] == ["ShadowDisagreement"]
    assert ACTIVE_ANNOTATION not in annotations(kube, 0) and SHADOW_ANNOTATION not in annotations(kube, 0)


def test_delta_published_once_and_rendered_for_the_fetch(tmp_path):
    """Without prefetch: a class moving from one variant to the next fetches a delta the operator published in
    its store; the template does not change again once the class serves the target."""
    from edgefleet.artifacts import open_store

    store = open_store(str(tmp_path))
    base = bytes(range(256)) * 400
    target = bytearray(base)
    target[1000:1040] = b"x" * 40
    a, b = (store.put(bytes(d), name="digits-cpu-arm64", media_type="application/octet-stream") for d in (base, target))
    kube = FakeKube()
    for ref in (a,):
        kube.add({**model(ref.digest), "status": {"variants": [{**model(ref.digest)["status"]["variants"][0],
                                                              "artifact": ref.ref}]}})
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": NS}, "spec": {"modelRef": {"name": "digits"}}})
    settings = Settings(artifact_store=str(tmp_path))
    world = World(dict(FLEET), builtin_profiles())
    reconcile_deployment(kube, settings, NS, "digits", world)
    kube.add({**model(b.digest), "status": {"variants": [{**model(b.digest)["status"]["variants"][0],
                                                          "artifact": b.ref}]}})
    reconcile_deployment(kube, settings, NS, "digits", world)
    workload = kube.stored("DaemonSet", "digits-cpu-arm64", NS)
    fetch = next(c for c in workload["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-model")
    flags = [x[len("--delta="):] for x in fetch["args"] if x.startswith("--delta=")]
    assert len(flags) == 1 and flags[0].startswith(f"base={a.digest},")
    fields = dict(part.split("=", 1) for part in flags[0].split(","))
    assert int(fields["sizeBytes"]) < len(target) // 10  # a 40-byte change: the delta is far below the variant
    assert kube.stored("DaemonSet", "digits-cpu-arm64", NS)["metadata"]["annotations"]["edgefleet.io/update"]
    from edgefleet_runtime import delta as runtime_delta

    patch = store.get(fields["ref"], fields["digest"])
    assert runtime_delta.apply(base, patch, len(target)) == bytes(target)  # it rebuilds the target exactly
    before = json.dumps(workload["spec"]["template"], sort_keys=True)
    started = time.perf_counter()
    reconcile_deployment(kube, settings, NS, "digits", world)  # the record keeps the delta: not made again
    assert time.perf_counter() - started < 5
    assert json.dumps(kube.stored("DaemonSet", "digits-cpu-arm64", NS)["spec"]["template"], sort_keys=True) == before


def test_delta_is_not_made_from_a_file_outside_the_local_store(tmp_path):
    """An EdgeModel status (writable by whoever may edit status) naming a file outside the store, even one whose
    digest it states right: nothing is read from it, no delta; the nodes fetch the full variant."""
    import hashlib

    from edgefleet.artifacts import open_store
    from edgefleet.reconcile.updates import deltas_for

    store = open_store(str(tmp_path / "store"))
    data = bytes(range(256)) * 100
    target = store.put(data[:-1] + b"!", name="m", media_type="application/octet-stream")
    outside = tmp_path / "elsewhere"
    outside.write_bytes(data)
    base = Ref("sha256:" + hashlib.sha256(data).hexdigest(), outside.as_uri())
    settings = Settings(artifact_store=str(tmp_path / "store"))
    record: dict = {}
    assert deltas_for(settings, spec(), "cpu-arm64", base, Ref(target.digest, target.ref), record) == []
    assert record["deltas"] == {"target": target.digest, "flags": []}
    inside = store.put(data, name="m", media_type="application/octet-stream")  # the same bytes in the store
    flags = deltas_for(settings, spec(), "cpu-arm64", Ref(inside.digest, inside.ref),
                       Ref(target.digest, target.ref), {})
    assert len(flags) == 1 and flags[0].startswith(f"base={inside.digest},")
