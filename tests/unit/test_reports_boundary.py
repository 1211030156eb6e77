"""Job reports cross a trust boundary: anyone who can push to the artifact store can overwrite a report tag. The
operator acts only on reports sealed with the Job's own key and bound to the Job (edgefleet_runtime.sealed);
forged and replayed reports are refused with a Warning event, and the compile cache it writes is sealed too."""

from __future__ import annotations

import base64
import json

import pytest
from edgefleet.api import builtin_profiles
from edgefleet.reconcile import World, reconcile_model
from edgefleet.settings import Settings
from edgefleet_runtime.sealed import ReportRejected, derive, open_sealed, seal, seal_from_env
from fake_kube import FakeKube

NS = "shop"
STORE = "oci://registry.local:5000/edgefleet"
TARGETS = ["cpu-arm64", "nvidia-jetson"]


def variant(profile: str, digest: str) -> dict:
    return {"profile": profile, "target": {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime"},
            "state": "Ready", "chosen": "fp32", "format": "onnx", "precision": "fp32", "quantization": "none",
            "artifact": f"{STORE}/digits-{profile}@{digest}", "digest": digest, "sizeBytes": 1000,
            "latency": {"p50Ms1": 0.1}, "metrics": {"accuracyDelta": 0.0}, "message": "fp32", "candidates": []}


def report(digest: str) -> bytes:
    return json.dumps({"variants": {t: variant(t, digest) for t in TARGETS}}).encode()


GENUINE = "sha256:" + "a" * 64
FORGED = "sha256:" + "7" * 64  # the attacker's always-answers-7 model


class Registry:
    """The artifact store as a dict of tags: what any pod with push access could write."""

    def __init__(self) -> None:
        self.tags: dict[str, bytes] = {}

    def get(self, ref: str, digest: str) -> bytes:
        from edgefleet.artifacts import StoreError

        if ref not in self.tags:
            raise StoreError(f"{ref}: not found")
        return self.tags[ref]


@pytest.fixture
def registry(monkeypatch) -> Registry:
    reg = Registry()
    monkeypatch.setattr("edgefleet.reconcile.reports.own_store", lambda *a: reg)
    monkeypatch.setattr("edgefleet.reconcile.reports.push_file",
                        lambda ref, data, *a: reg.tags.__setitem__(ref, data))
    return reg


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS, "uid": "uid-1", "generation": 1},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx",
                       "targetProfiles": {"names": TARGETS}}})
    return fake


def settings() -> Settings:
    return Settings(compile_executor="job", artifact_store=STORE)


def reconcile(kube: FakeKube) -> dict[str, dict]:
    reconcile_model(kube, settings(), NS, "digits", World({}, builtin_profiles()))
    return {v["profile"]: v for v in kube.stored("EdgeModel", "digits", NS)["status"]["variants"]}


def started_job(kube: FakeKube) -> tuple[str, bytes]:
    """The compile Job the operator started and the report key it gave that Job only (read as its pod would)."""
    (job,) = kube.list("Job", settings().namespace)
    name = job["metadata"]["name"]
    secret = kube.stored("Secret", f"{name}-report-key", settings().namespace)
    assert secret["metadata"]["ownerReferences"][0]["name"] == name
    return name, bytes.fromhex(secret["stringData"]["key"])


def finish(kube: FakeKube, name: str) -> None:
    kube.set_status("Job", name, settings().namespace, {"conditions": [
        {"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "completionTime": "2026-01-01T00:00:00Z"})


def test_boundary_sealed_reports_refuse_forgery_alteration_and_replay():
    key = derive(b"m" * 32, "job:compile-a")
    envelope = seal(key, "compile-a", b'{"variants": {}}')
    assert open_sealed(key, "compile-a", envelope) == b'{"variants": {}}'
    with pytest.raises(ReportRejected, match="not a sealed report"):
        open_sealed(key, "compile-a", b'{"variants": {}}')
    altered = json.loads(envelope)
    altered["report"] = '{"variants": {"x": 1}}'
    with pytest.raises(ReportRejected, match="MAC does not verify"):
        open_sealed(key, "compile-a", json.dumps(altered).encode())
    with pytest.raises(ReportRejected, match="replayed"):
        open_sealed(derive(b"m" * 32, "job:compile-b"), "compile-b", envelope)
    assert derive(b"m" * 32, "job:compile-a") != derive(b"n" * 32, "job:compile-a")
    with pytest.raises(ValueError, match="at least 32"):
        derive(b"short", "job:compile-a")


def test_boundary_seal_from_env_uses_the_key_the_operator_mounted(tmp_path, monkeypatch):
    key = bytes(range(32))
    (tmp_path / "key").write_text(key.hex())
    assert seal_from_env(b"{}") == b"{}"  # a CLI run by hand pushes plain reports
    monkeypatch.setenv("EDGEFLEET_REPORT_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("EDGEFLEET_REPORT_BINDING", "compile-a")
    assert open_sealed(key, "compile-a", seal_from_env(b"{}")) == b"{}"


def test_boundary_a_genuine_report_is_accepted_and_cached_sealed_by_the_operator(kube, registry):
    assert {v["state"] for v in reconcile(kube).values()} == {"Compiling"}
    name, key = started_job(kube)
    registry.tags[f"{STORE}:{name}-report"] = seal(key, name, report(GENUINE))  # as the Job pushes it
    finish(kube, name)
    variants = reconcile(kube)
    assert {v["state"] for v in variants.values()} == {"Ready"}
    assert {v["digest"] for v in variants.values()} == {GENUINE}
    cached = [ref for ref in registry.tags if ":compiled-" in ref]
    assert len(cached) == 1  # written by the operator, sealed with its own key, not the Job's
    master = bytes.fromhex(base64.b64decode(
        kube.stored("Secret", settings().results_key_secret, settings().namespace)["data"]["key"]).decode())
    binding = "content:" + cached[0].rsplit(":compiled-", 1)[1]
    assert json.loads(open_sealed(derive(master, binding), binding, registry.tags[cached[0]]))["variants"]
    with pytest.raises(ReportRejected):
        open_sealed(key, binding, registry.tags[cached[0]])


def test_boundary_a_report_tag_overwritten_by_a_pod_is_refused_with_an_event(kube, registry):
    reconcile(kube)
    name, _ = started_job(kube)
    registry.tags[f"{STORE}:{name}-report"] = report(FORGED)  # an unauthenticated push over the tag
    finish(kube, name)
    variants = reconcile(kube)
    assert {v["state"] for v in variants.values()} == {"Failed"}
    assert {v["reason"] for v in variants.values()} == {"ReportRejected"}
    assert all(FORGED not in json.dumps(v) for v in variants.values())
    assert "not a sealed report" in variants["cpu-arm64"]["message"] and "Fix:" in variants["cpu-arm64"]["message"]
    assert [e["reason"] for e in kube.warnings()] == ["ReportRejected"]
    assert not [ref for ref in registry.tags if ":compiled-" in ref]  # nothing forged enters the cache


def test_boundary_a_forged_report_at_the_tag_of_a_job_gone_by_its_ttl_makes_the_job_run_again(kube, registry):
    """No Job exists (its TTL removed it, or the model was applied again): a forgery at its report tag is refused
    with an event and the Job runs again, whose sealed report then replaces it; no variant fails for it."""
    reconcile(kube)
    name, key = started_job(kube)
    kube.delete("Job", name, settings().namespace)
    registry.tags[f"{STORE}:{name}-report"] = report(FORGED)
    variants = reconcile(kube)
    assert {v["state"] for v in variants.values()} == {"Compiling"}
    assert [j["metadata"]["name"] for j in kube.list("Job", settings().namespace)] == [name]
    assert [e["reason"] for e in kube.warnings()] == ["ReportRejected"]
    assert "runs again" in kube.warnings()[0]["message"]
    registry.tags[f"{STORE}:{name}-report"] = seal(key, name, report(GENUINE))  # the new Job's report
    finish(kube, name)
    assert {v["digest"] for v in reconcile(kube).values()} == {GENUINE}


def test_boundary_a_report_replayed_from_another_job_is_refused(kube, registry):
    reconcile(kube)
    name, _ = started_job(kube)
    other = "compile-digits-000000000000"  # e.g. the same model's Job in the attacker's own namespace
    master = bytes.fromhex(base64.b64decode(
        kube.stored("Secret", settings().results_key_secret, settings().namespace)["data"]["key"]).decode())
    registry.tags[f"{STORE}:{name}-report"] = seal(derive(master, f"job:{other}"), other, report(FORGED))
    finish(kube, name)
    variants = reconcile(kube)
    assert {v["reason"] for v in variants.values()} == {"ReportRejected"}
    assert "replayed" in variants["cpu-arm64"]["message"]


def test_boundary_a_forged_compile_cache_entry_is_ignored_and_a_job_runs(kube, registry, monkeypatch):
    forged = report(FORGED)

    class Poisoned(Registry):
        def get(self, ref: str, digest: str) -> bytes:
            return forged if ":compiled-" in ref else super().get(ref, digest)

    poisoned = Poisoned()
    monkeypatch.setattr("edgefleet.reconcile.reports.own_store", lambda *a: poisoned)
    variants = reconcile(kube)
    assert {v["state"] for v in variants.values()} == {"Compiling"}  # a Job of its own, not the forged cache
    assert len(kube.list("Job", settings().namespace)) == 1
    assert [e["reason"] for e in kube.warnings()] == ["ReportRejected"]


def test_boundary_a_federated_server_report_is_accepted_only_when_sealed_for_this_run(kube, registry):
    """The server's report decides the publish (the target EdgeModel's new source, then signed and rolled out):
    a report pushed by anything but this run's server pod, or sealed for a namesake run, is refused."""
    from edgefleet.api.federated import FederatedTraining
    from edgefleet.reconcile import federated
    from edgefleet.reconcile.reports import master_key
    from edgefleet.render import federated as r

    def run(uid: str) -> FederatedTraining:
        return FederatedTraining.model_validate({
            "apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining",
            "metadata": {"name": "ft", "namespace": NS, "uid": uid, "generation": 1},
            "spec": {"sourceModel": {"name": "digits"}, "targetModel": {"name": "digits"},
                     "participants": {"nodeSelector": {"matchLabels": {"edge": "yes"}}},
                     "localData": {"hostPath": "/var/lib/digits"},
                     "evaluation": {"data": {"configMap": {"name": "inputs", "key": "eval.npz"}}}}})

    ft, namesake = run("uid-now"), run("uid-before")
    ref = r.report_ref(r.tenant_store(settings().artifact_store, settings(), ft), ft)  # the namespace's own repository
    master = master_key(kube, settings())
    published = json.dumps({"state": "Succeeded", "published": {"digest": FORGED}}).encode()
    registry.tags[ref] = published  # unsealed
    with pytest.raises(federated.RunFailed, match="ReportRejected|not a sealed report"):
        federated._report(kube, settings(), ft)
    old = r.report_binding(namesake)  # the run of a deleted FederatedTraining of the same name
    registry.tags[ref] = seal(derive(master, f"job:{old}"), old, published)
    with pytest.raises(federated.RunFailed, match="replayed"):
        federated._report(kube, settings(), ft)
    binding = r.report_binding(ft)
    registry.tags[ref] = seal(derive(master, f"job:{binding}"), binding, published)
    assert federated._report(kube, settings(), ft)["published"]["digest"] == FORGED  # what this run's server said


def test_tenant_compile_slots_a_namespace_waits_for_its_own_and_never_holds_another_namespaces_compiles(kube,
                                                                                                       registry):
    """EDGEFLEET_COMPILE_JOBS_PER_NAMESPACE: a namespace at its limit of running compile Jobs queues its next
    compile (Compiling, reason CompileQueued, naming its Jobs); another namespace's compile starts meanwhile."""
    def model(ns: str, name: str) -> None:
        kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
                  "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}", "generation": 1},
                  "spec": {"source": {"uri": f"https://models.local/{name}.onnx"}, "format": "onnx",
                           "targetProfiles": {"names": TARGETS}}})

    slots = Settings(compile_executor="job", artifact_store=STORE, compile_jobs_per_namespace=2)
    world = World({}, builtin_profiles())
    for name in ("a", "b", "c"):
        model(NS, name)
    model("other", "d")
    for name in ("a", "b", "c"):
        reconcile_model(kube, slots, NS, name, world)
    status = {v["profile"]: v for v in kube.stored("EdgeModel", "c", NS)["status"]["variants"]}
    assert {v["state"] for v in status.values()} == {"Compiling"}
    assert {v["reason"] for v in status.values()} == {"CompileQueued"}
    assert "limit is 2" in status["cpu-arm64"]["message"] and "EDGEFLEET_COMPILE_JOBS_PER_NAMESPACE" in \
        status["cpu-arm64"]["message"]
    assert len(kube.list("Job", slots.namespace)) == 2
    reconcile_model(kube, slots, "other", "d", world)  # another namespace is not held up
    assert len(kube.list("Job", slots.namespace)) == 3
    first = sorted(j["metadata"]["name"] for j in kube.list("Job", slots.namespace)
                   if j["metadata"]["labels"]["edgefleet.io/model-namespace"] == NS)[0]
    finish(kube, first)  # a slot frees: the queued compile starts
    reconcile_model(kube, slots, NS, "c", world)
    assert len(kube.list("Job", slots.namespace)) == 4
