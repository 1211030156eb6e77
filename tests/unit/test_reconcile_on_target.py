"""On-target selection in the EdgeModel reconciler, against the in-memory fake of the one writer: after the
compile (Job executor, its report faked), one benchmark Job per class on a node that can run it, its report read
back from the store, the fastest candidate there chosen; restarts start no second Job; failures fall back to
the host's choice with a condition and one Warning event."""

from __future__ import annotations

import base64

import pytest
from edgefleet.api import HardwareProfile, builtin_profiles
from edgefleet.reconcile import World, on_target, reconcile_deployment, reconcile_model
from edgefleet.settings import Settings
from fake_kube import FakeKube, no_namespace

NS = "shop"
CLASS = "intel-openvino"
STORE = "oci://registry.local:5000/edgefleet"
FP32 = "sha256:" + "a" * 64
INT8 = "sha256:" + "b" * 64
REAL_TAINT = {"key": "edgefleet.io/real-node", "value": "true", "effect": "NoSchedule"}
INTEL = {"kubernetes.io/arch": "amd64", "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI": "true"}


def compile_report() -> dict:
    """The compile Job's report: the host chose openvino-fp32 (0.1 ms) over openvino-int8 (0.2 ms)."""
    def cand(name, digest, state, p50, precision, quantization):
        return {"name": name, "format": "openvino", "precision": precision, "quantization": quantization,
                "runtime": "openvino", "state": state, "sha256": digest, "sizeBytes": 1000, "withinBudget": True,
                "artifact": f"{STORE}/digits-{CLASS}@sha256:{digest[7:15]}", "latency": {"p50Ms1": p50},
                "metrics": {"accuracyDelta": 0.0}}
    variant = {"profile": CLASS, "target": {"format": "openvino", "precision": "int8", "runtime": "openvino"},
               "state": "Ready", "chosen": "openvino-fp32", "format": "openvino", "precision": "fp32",
               "quantization": "none", "artifact": f"{STORE}/digits-{CLASS}@sha256:{FP32[7:15]}", "digest": FP32,
               "sizeBytes": 1000, "latency": {"p50Ms1": 0.1}, "metrics": {"accuracyDelta": 0.0},
               "message": "openvino-fp32: 3x smaller", "candidates": [
                   cand("openvino-fp32", FP32, "Chosen", 0.1, "fp32", "none"),
                   cand("openvino-int8", INT8, "Lost", 0.2, "int8", "static-int8")]}
    return {"variants": {CLASS: variant}}


def bench_report(fp32_ms: float, int8_ms: float, node: str = "vm", fp32_accuracy: float = 0.98,
                 int8_accuracy: float = 0.98) -> dict:
    def result(digest, p50, accuracy):
        return {"digest": digest, "p50Ms1": p50, "p95Ms1": p50 * 2, "threadsN": 2, "p50MsN": p50, "p95MsN": p50 * 2,
                "throughputPerSecond": 1000 / p50, "peakRssBytes": 80 << 20, "loadSeconds": 0.05,
                "accuracy": accuracy}
    return {"kind": "BenchReport", "node": node, "results": [result(FP32, fp32_ms, fp32_accuracy),
                                                             result(INT8, int8_ms, int8_accuracy)]}


class Store:
    """The artifact store as the reconcilers read it: the compile report, and a bench report once pushed."""

    def __init__(self) -> None:
        self.bench: dict | None = None
        self.sealed: list[str] = []  # compile-cache entries the operator wrote after accepting a report

    def seal(self, settings, ref: str, master: bytes, content_key: str, report: dict) -> None:
        self.sealed.append(ref)

    def read(self, settings, ref: str, key: bytes, binding: str) -> dict | None:
        return compile_report() if "/compile-" in ref or ":compile-" in ref else self.bench


@pytest.fixture
def store(monkeypatch) -> Store:
    s = Store()
    monkeypatch.setattr("edgefleet.reconcile.compile_job.read_report", s.read)
    monkeypatch.setattr("edgefleet.reconcile.model_jobs.read_report", s.read)
    monkeypatch.setattr("edgefleet.reconcile.compile_job.seal_into_store", s.seal)
    return s


def node(name: str, labels: dict, taints=(), ready=True, kwok=False) -> dict:
    meta = {"name": name, "labels": labels}
    if kwok:
        meta["annotations"] = {"kwok.x-k8s.io/node": "fake"}
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": {"taints": list(taints)},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def profiles(tolerate_real_node: bool = True) -> list[HardwareProfile]:
    out = []
    for p in builtin_profiles():
        raw = p.to_dict()
        if p.metadata["name"] == CLASS and tolerate_real_node:
            raw["spec"]["tolerations"].append({"key": "edgefleet.io/real-node", "operator": "Exists",
                                               "effect": "NoSchedule"})
        out.append(HardwareProfile.model_validate(raw))
    return out


@pytest.fixture
def kube(store) -> FakeKube:
    fake = FakeKube()
    fake.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "digits-model", "namespace": NS},
              "binaryData": {"digits_eval.npz": base64.b64encode(b"eval-bytes").decode()}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx",
                       "optimization": {"evaluation": {"configMap": {"name": "digits-model",
                                                                     "key": "digits_eval.npz"}}},
                       "targetProfiles": {"names": [CLASS]}}})
    for n in (node("intel-a", INTEL, ready=False),  # by name first, but NotReady
              node("intel-nuc-0", INTEL, kwok=True),  # simulated: runs no containers
              node("intel-tainted", INTEL, [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]),
              node("vm", INTEL, [REAL_TAINT])):
        fake.add(n)
    return fake


def world(kube: FakeKube, tolerate_real_node: bool = True) -> World:
    nodes = {o["metadata"]["name"]: o["metadata"]["labels"] for (k, _, _), o in kube.objects.items() if k == "Node"}
    return World(nodes, profiles(tolerate_real_node))


def settings() -> Settings:
    return Settings(compile_executor="job", artifact_store=STORE, namespace="edgefleet-system")


def variant(kube) -> dict:
    return kube.stored("EdgeModel", "digits", NS)["status"]["variants"][0]


def condition(kube, type_: str) -> dict:
    return next(c for c in kube.stored("EdgeModel", "digits", NS)["status"]["conditions"] if c["type"] == type_)


def bench_jobs(kube) -> list[dict]:
    return [o for (k, _, _), o in kube.objects.items() if k == "Job" and o["metadata"]["name"].startswith("bench-")]


def finish(job: dict, kube: FakeKube, outcome: str = "Complete") -> None:
    kube.set_status("Job", job["metadata"]["name"], "edgefleet-system", {
        "conditions": [{"type": outcome, "status": "True", "reason": "BackoffLimitExceeded" if outcome == "Failed"
                        else "", "message": "Job has reached the specified backoff limit" if outcome == "Failed"
                        else "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "completionTime": "2026-01-01T00:00:00Z"})


def test_one_bench_job_on_the_node_that_can_run_it_and_the_variant_waits(kube):
    again = reconcile_model(kube, settings(), NS, "digits", world(kube))
    (job,) = bench_jobs(kube)
    pod = job["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchFields"][0]["values"] == ["vm"], "not the NotReady, kwok or untolerated nodes"
    assert job["spec"]["activeDeadlineSeconds"] == settings().bench_deadline_seconds
    assert [next(a for a in c["args"] if a.startswith("--digest=")) for c in pod["initContainers"]] == [
        f"--digest={FP32}", f"--digest={INT8}"]
    inputs = kube.stored("ConfigMap", job["metadata"]["name"], "edgefleet-system")
    assert base64.b64decode(inputs["binaryData"]["eval.npz"]) == b"eval-bytes"
    assert inputs["metadata"]["ownerReferences"][0]["name"] == job["metadata"]["name"]
    v = variant(kube)
    assert (v["state"], v["digest"]) == ("Benchmarking", FP32)
    assert "measuring 2 candidates on vm" in v["message"]
    assert (condition(kube, "Ready")["status"], condition(kube, "Ready")["reason"]) == ("False", "Benchmarking")
    assert condition(kube, on_target.CONDITION)["reason"] == "Benchmarking"
    assert again == on_target.RELOOK_SECONDS
    # an operator restart (a fresh reconcile, same world) finds the Job: no second one, nothing rewritten
    writes = len([c for c in kube.calls if c[0] in ("apply", "patch_status")])
    assert reconcile_model(kube, settings(), NS, "digits", world(kube)) == on_target.RELOOK_SECONDS
    assert len(bench_jobs(kube)) == 1
    assert len([c for c in kube.calls if c[0] in ("apply", "patch_status")]) == writes


def test_the_fastest_on_target_is_chosen_where_the_host_chose_another(kube, store):
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    (job,) = bench_jobs(kube)
    finish(job, kube)
    store.bench = bench_report(fp32_ms=0.30, int8_ms=0.12)  # the node prefers int8; the host chose fp32
    assert reconcile_model(kube, settings(), NS, "digits", world(kube)) is None
    v = variant(kube)
    assert (v["state"], v["selection"], v["reason"]) == ("Ready", "onTarget", "FastestOnTarget")
    assert (v["digest"], v["precision"], v["quantization"]) == (INT8, "int8", "static-int8")
    assert v["onTarget"]["node"] == "vm" and v["onTarget"]["latencyP50Ms"] == 0.12
    assert v["onTarget"]["throughputPerSecond"] == pytest.approx(1000 / 0.12)
    assert "the host chose openvino-fp32" in v["message"]
    assert [c["name"] for c in v["candidates"]] == ["openvino-int8", "openvino-fp32"]
    assert {c["name"]: c["onTarget"]["latencyP50Ms"] for c in v["candidates"]} == {
        "openvino-int8": 0.12, "openvino-fp32": 0.30}
    assert condition(kube, on_target.CONDITION)["status"] == "True"
    assert condition(kube, "Ready")["status"] == "True"
    assert not kube.warnings()
    # up to date: a resync reads nothing from the store and writes nothing
    calls = len(kube.calls)
    store.bench = None
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    assert [c for c in kube.calls[calls:] if c[0] not in ("list", "get")] == []


def test_the_host_choice_stays_when_the_node_agrees(kube, store):
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    finish(bench_jobs(kube)[0], kube)
    store.bench = bench_report(fp32_ms=0.10, int8_ms=0.25)
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    v = variant(kube)
    assert (v["digest"], v["selection"]) == (FP32, "onTarget")
    assert "the host chose it too" in v["message"]


def test_a_failed_bench_job_falls_back_to_the_host_choice_with_a_condition_and_one_event(kube):
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    (job,) = bench_jobs(kube)
    finish(job, kube, "Failed")
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    v = variant(kube)
    assert (v["state"], v["selection"], v["reason"], v["digest"]) == ("Ready", "host", "BenchJobFailed", FP32)
    assert f"kubectl logs -n edgefleet-system job/{job['metadata']['name']}" in v["message"]
    cond = condition(kube, on_target.CONDITION)
    assert (cond["status"], cond["reason"]) == ("False", "BenchJobFailed")
    assert "backoff limit" in cond["message"]
    assert condition(kube, "Ready")["status"] == "True", "the host's variant serves"
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    assert [e["reason"] for e in kube.warnings()] == ["BenchJobFailed"]


def test_a_class_without_a_node_that_can_run_the_job_is_selected_on_the_host(kube):
    reconcile_model(kube, settings(), NS, "digits", world(kube, tolerate_real_node=False))
    assert bench_jobs(kube) == []
    v = variant(kube)
    assert (v["state"], v["selection"], v["reason"]) == ("Ready", "host", "NoSchedulableNode")
    cond = condition(kube, on_target.CONDITION)
    assert (cond["status"], cond["reason"]) == ("False", "NoSchedulableNode")
    assert not kube.warnings(), "a fleet without a real node of the class is not an error"


def test_selection_host_starts_no_job(kube):
    kube.stored("EdgeModel", "digits", NS)["spec"]["optimization"]["selection"] = "host"
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    assert bench_jobs(kube) == []
    assert (variant(kube)["selection"], variant(kube)["reason"]) == ("host", "SelectionHost")


def test_a_new_generation_deletes_the_running_bench_job_of_the_old_one(kube):
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    (old,) = bench_jobs(kube)
    em = kube.stored("EdgeModel", "digits", NS)
    em["metadata"]["generation"] = 2
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    (new,) = bench_jobs(kube)
    assert new["metadata"]["name"] != old["metadata"]["name"]
    assert ("delete", "Job", old["metadata"]["name"]) in kube.calls


def test_a_gate_on_a_variant_selected_on_the_host_fails_with_the_reason(kube):
    reconcile_model(kube, settings(), NS, "digits", world(kube, tolerate_real_node=False))
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"modelRef": {"name": "digits"}, "rollout": {"gate": {"maxLatencyP95Ms": 5}}}})
    reconcile_deployment(kube, settings(), NS, "digits", world(kube, tolerate_real_node=False))
    ed = kube.stored("EdgeDeployment", "digits", NS)["status"]
    degraded = next(c for c in ed["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "GateFailed")
    assert "NoSchedulableNode" in degraded["message"]


def test_a_bench_job_the_api_server_cannot_take_falls_back_to_the_host_with_the_fix(kube):
    """The operator's namespace is missing (a host-run operator): the variant is chosen on the host at once, with
    a Warning naming the namespace, instead of retrying the Job forever."""
    kube.fail("apply", "Job", no_namespace("edgefleet-system"))
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    v = variant(kube)
    assert (v["state"], v["selection"], v["reason"], v["digest"]) == ("Ready", "host", "BenchUnavailable", FP32)
    assert "namespace edgefleet-system does not exist" in v["message"] and "EDGEFLEET_NAMESPACE" in v["message"]
    assert [e["reason"] for e in kube.warnings()] == ["BenchUnavailable"]


def budget(kube, max_drop: float) -> None:
    em = kube.stored("EdgeModel", "digits", NS)
    em["spec"]["optimization"]["accuracyBudget"] = {"maxAccuracyDrop": max_drop}


def test_boundary_a_candidate_outside_the_accuracy_budget_on_target_is_never_selected_however_fast(kube, store):
    """int8 is 10x faster on the node but answers like a forged model there (accuracy 0.10 vs 0.98): the node's
    own measurement gates the selection as the compile-time budget does."""
    budget(kube, 1.0)
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    (job,) = bench_jobs(kube)
    finish(job, kube)
    store.bench = bench_report(fp32_ms=0.30, int8_ms=0.03, int8_accuracy=0.10)
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    v = variant(kube)
    assert (v["state"], v["digest"]) == ("Ready", FP32)
    assert v["digest"] != INT8


def test_boundary_on_target_accuracy_drops_are_measured_against_the_source(kube, store):
    budget(kube, 1.0)
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    (job,) = bench_jobs(kube)
    finish(job, kube)
    # the anchor (fp32, compile-time delta 0.0) sets the source at 0.98; int8 drops 30 points on the node
    store.bench = bench_report(fp32_ms=0.30, int8_ms=0.03, fp32_accuracy=0.98, int8_accuracy=0.68)
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    assert variant(kube)["digest"] == FP32  # fp32 is within budget: chosen
    from edgefleet.render.bench_job import accuracy_drops_on_target, on_target_results, within_budget_on_target

    candidates = [{"digest": FP32, "accuracyDelta": 0.0}, {"digest": INT8, "accuracyDelta": -0.5}]
    drops = accuracy_drops_on_target(on_target_results(bench_report(1, 1, fp32_accuracy=0.5, int8_accuracy=0.2)),
                                     candidates)
    assert drops == {FP32: 0.0, INT8: 30.0}
    assert within_budget_on_target(drops, [FP32, INT8], 1.0) == [FP32]
    assert within_budget_on_target(drops, [FP32, INT8], None) == [FP32, INT8]
    assert within_budget_on_target({}, [FP32, INT8], 1.0) == [FP32, INT8]  # no labels: compile-time verdict


def test_boundary_the_on_target_gate_is_anchored_on_the_candidate_closest_to_the_source(kube, store):
    budget(kube, 1.0)
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    (job,) = bench_jobs(kube)
    finish(job, kube)
    em = kube.stored("EdgeModel", "digits", NS)
    for c in em["status"]["variants"][0]["candidates"]:
        c["accuracyDelta"] = 0.0  # the compile host measured both at the source's accuracy
    store.bench = bench_report(fp32_ms=0.30, int8_ms=0.03, fp32_accuracy=0.10, int8_accuracy=0.98)
    reconcile_model(kube, settings(), NS, "digits", world(kube))
    v = variant(kube)
    # anchored on the best compile-time delta (fp32 first at 0.0): fp32 is the reference, int8 gains -> int8 wins;
    # the gate never removes the candidate that keeps accuracy
    assert (v["state"], v["digest"]) == ("Ready", INT8)
