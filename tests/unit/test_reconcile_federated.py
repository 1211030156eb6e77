"""FederatedTraining reconciler against the in-memory writer; the server's report is played by the test."""

from __future__ import annotations

import base64

import pytest
from edgefleet.api import load
from edgefleet.api.base import format_errors
from edgefleet.kube import ApiError
from edgefleet.reconcile.federated import reconcile_federated
from edgefleet.settings import Settings
from fake_kube import FakeKube, api_error
from federated_helpers import EVAL, fresh_head_model
from pydantic import ValidationError

NS = "team"
SETTINGS = Settings(artifact_store="oci://registry.local:5000/edgefleet", trainer_image="reg/trainer:1")
DIGEST = "sha256:" + "ab" * 32


def spec(**over) -> dict:
    s = {"sourceModel": {"name": "digits"}, "targetModel": {"name": "digits"},
         "participants": {"nodeSelector": {"matchLabels": {"edge": "yes"}}, "clientsPerNode": 3,
                          "tolerations": [{"key": "edgefleet.io/real-node", "operator": "Exists"}]},
         "localData": {"hostPath": "/var/lib/digits"}, "rounds": 2, "minClients": 2,
         "evaluation": {"data": {"configMap": {"name": "inputs", "key": "eval.npz"}}, "minAccuracy": 0.5}}
    s.update(over)
    return s


@pytest.fixture
def kube(monkeypatch):
    fake = FakeKube()
    fake.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "inputs", "namespace": NS},
              "binaryData": {"model.onnx": base64.b64encode(fresh_head_model()).decode(),
                             "eval.npz": base64.b64encode(EVAL.read_bytes()).decode()}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"configMap": {"name": "inputs", "key": "model.onnx"}}, "format": "onnx"}})
    fake.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "vm", "labels": {"edge": "yes"}}})
    fake.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kwok-1", "labels": {"edge": "no"}}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining",
              "metadata": {"name": "ft", "namespace": NS, "uid": "1234567890", "generation": 1}, "spec": spec()})
    fake.report = None
    monkeypatch.setattr("edgefleet.reconcile.federated._report", lambda settings, ft: fake.report)
    return fake


def step(kube) -> dict:
    return reconcile_federated(kube, SETTINGS, kube.get("FederatedTraining", "ft", NS))


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def client_jobs(kube) -> list[dict]:
    return [j for j in kube.list("Job", NS) if j["metadata"]["labels"]["app.kubernetes.io/component"] == "client"]


def test_federated_run_starts_server_clients_and_a_secret_it_never_reads(kube):
    for verb in ("get", "list"):  # the chart lets the operator create Secrets in a user's namespace, not read them
        kube.fail(verb, "Secret", api_error(403, "secrets is forbidden", "Forbidden"))
    status = step(kube)
    assert cond(status, "Progressing")["status"] == "True" and status["clients"] == 3
    jobs = client_jobs(kube)
    assert sorted(j["metadata"]["name"] for j in jobs) == ["fl-ft-c-vm-0", "fl-ft-c-vm-1", "fl-ft-c-vm-2"]
    pods = [j["spec"]["template"] for j in jobs]
    assert all(j["spec"]["backoffLimit"] == 0 for j in jobs)  # a client that dies is not replaced
    assert all(p["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "vm"} for p in pods)
    assert {a for p in pods for a in p["spec"]["containers"][0]["args"] if a.startswith("--index")} == {
        "--index=0", "--index=1", "--index=2"}
    assert all(p["spec"]["containers"][0]["image"] == "reg/trainer:1" for p in pods)
    job = kube.get("Job", "fl-ft", NS)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--expected-clients=3" in args and "--min-clients=2" in args and "--min-accuracy=0.5" in args
    secret = kube.stored("Secret", "fl-ft-run", NS)
    assert set(secret["data"]) == {"ca.crt", "server.crt", "server.key", "client.crt", "client.key", "model.onnx",
                                   "eval.npz"}
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "FederatedTraining"  # GC deletes it with the run
    # the server mounts only its own key; clients only theirs, and never the evaluation data
    def items(pod):
        return {i["key"] for v in pod["spec"]["volumes"] if "secret" in v for i in v["secret"]["items"]}
    assert items(job["spec"]["template"]) == {"ca.crt", "server.crt", "server.key", "model.onnx", "eval.npz"}
    assert all(items(p) == {"ca.crt", "client.crt", "client.key", "model.onnx"} for p in pods)
    # a second step changes nothing: the Secret is not made again, a lost client is not replaced by a new key
    kube.calls.clear()
    step(kube)
    assert kube.stored("Secret", "fl-ft-run", NS)["data"] == secret["data"]
    assert not [c for c in kube.calls if c[1] == "Secret"]


def test_federated_secret_that_exists_already_counts_as_made(kube):
    kube.add({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fl-ft-run", "namespace": NS},
              "data": {"ca.crt": "eA=="}})
    kube.fail("get", "Secret", api_error(403, "secrets is forbidden", "Forbidden"))
    status = step(kube)  # 409 AlreadyExists from create: the run goes on
    assert cond(status, "Progressing")["status"] == "True"
    assert ("create", "Secret", "fl-ft-run") in kube.calls and kube.find("Job", "fl-ft", NS) is not None


def test_federated_rounds_reach_status_and_success_updates_the_target_model(kube):
    step(kube)
    kube.report = {"state": "Running", "startAccuracy": 0.09, "rounds": [
        {"round": 1, "clients": 3, "failures": 0, "loss": 1.2, "accuracy": 0.7}]}
    status = step(kube)
    assert status["roundsDone"] == 1 and status["rounds"][0]["clients"] == 3
    kube.report = {**kube.report, "state": "Succeeded", "finalAccuracy": 0.94, "message": "accuracy 0.09 -> 0.94",
                   "published": {"ref": "oci://registry.local:5000/edgefleet@sha256:" + "cd" * 32, "digest": DIGEST}}
    status = step(kube)
    assert cond(status, "Progressing")["status"] == "True"  # the Job has not completed yet
    kube.get("Job", "fl-ft", NS)  # the Job completes
    kube.set_status("Job", "fl-ft", NS, {"conditions": [{"type": "Complete", "status": "True"}]})
    status = step(kube)
    assert cond(status, "Succeeded")["reason"] == "Published" and status["publishedDigest"] == DIGEST
    em = kube.get("EdgeModel", "digits", NS)
    assert em["spec"]["source"] == {"uri": kube.report["published"]["ref"], "digest": DIGEST}
    assert em["spec"]["format"] == "onnx"
    assert client_jobs(kube) == []  # clients stopped
    assert kube.events[-1]["reason"] == "Published"


def test_federated_failed_run_publishes_nothing(kube):
    step(kube)
    kube.report = {"state": "Failed", "reason": "RoundFailed",
                   "message": "round 2: 1 clients returned an update, 2 failed; the minimum is 2", "rounds": [
                       {"round": 1, "clients": 3, "failures": 0, "loss": 1.2, "accuracy": 0.7}]}
    kube.set_status("Job", "fl-ft", NS, {"conditions": [{"type": "Failed", "status": "True"}]})
    status = step(kube)
    failed = cond(status, "Failed")
    assert failed["reason"] == "RoundFailed" and "minimum is 2" in failed["message"]
    assert "publishedDigest" not in status
    assert status["roundsDone"] == 1 and status["rounds"][0]["clients"] == 3  # the failed run's rounds stay visible
    assert kube.get("EdgeModel", "digits", NS)["spec"]["source"] == {"configMap": {"name": "inputs",
                                                                                   "key": "model.onnx"}}
    assert kube.warnings()[-1]["reason"] == "RoundFailed"
    assert step(kube) == status  # terminal


def finish_with_a_published_model(kube) -> None:
    step(kube)
    kube.report = {"state": "Succeeded", "startAccuracy": 0.09, "finalAccuracy": 0.94, "message": "0.09 -> 0.94",
                   "rounds": [{"round": 1, "clients": 3, "failures": 0, "loss": 0.3, "accuracy": 0.94}],
                   "published": {"ref": "oci://registry.local:5000/edgefleet@" + DIGEST, "digest": DIGEST}}
    kube.set_status("Job", "fl-ft", NS, {"conditions": [{"type": "Complete", "status": "True"}]})


def test_federated_publish_refused_by_the_api_server_fails_once_with_the_fix_and_no_retry(kube):
    finish_with_a_published_model(kube)
    kube.fail("patch", "EdgeModel", api_error(422, 'EdgeModel.edgefleet.io "digits" is invalid: spec.source: '
                                                   "set exactly one of source.uri or source.configMap", "Invalid"))
    status = step(kube)  # returns instead of raising: the controller does not retry it
    failed = cond(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidManifest"
    assert "refused the publish to EdgeModel team/digits (HTTP 422)" in failed["message"]
    assert "set exactly one of source.uri" in failed["message"]
    assert "Fix: change the target EdgeModel (spec.targetModel) field named in the message" in failed["message"]
    assert cond(status, "Progressing")["status"] == "False" and "publishedDigest" not in status
    assert kube.get("EdgeModel", "digits", NS)["spec"]["source"] == {"configMap": {"name": "inputs",
                                                                                   "key": "model.onnx"}}
    assert client_jobs(kube) == []
    patches = kube.calls.count(("patch", "EdgeModel", "digits"))
    assert step(kube) == status and step(kube) == status  # terminal: no retry, no second event
    assert kube.calls.count(("patch", "EdgeModel", "digits")) == patches
    assert [(w["object"], w["reason"]) for w in kube.warnings()] == [("ft", "InvalidManifest")]


def test_federated_children_refused_fail_the_run_with_the_fix_and_transient_errors_are_retried(kube):
    kube.fail("apply", "Job", api_error(500, "etcdserver: request timed out"))
    with pytest.raises(ApiError):  # transient: the controller retries it with backoff
        step(kube)
    kube.fail("apply", "Job", api_error(403, 'jobs.batch is forbidden: User "system:serviceaccount:edgefleet-system:'
                                             'edgefleet" cannot create resource "jobs"', "Forbidden"))
    status = step(kube)
    failed = cond(status, "Failed")
    assert failed["reason"] == "Forbidden" and "the Secret, Service or Jobs of FederatedTraining team/ft" in \
        failed["message"]
    assert "Fix: grant the operator's ServiceAccount this permission" in failed["message"]
    assert [w["reason"] for w in kube.warnings()] == ["Forbidden"]
    assert step(kube) == status


def test_federated_min_clients_above_the_participants_fails_with_the_fix(kube):
    obj = kube.get("FederatedTraining", "ft", NS)
    obj["spec"]["minClients"] = 5
    kube.add(obj)
    status = step(kube)
    assert cond(status, "Failed")["reason"] == "NotEnoughClients"
    assert "lower minClients or widen participants" in cond(status, "Failed")["message"]
    assert kube.list("Job", NS) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"participants": {"clientsPerNode": 2}}, "participants: set nodeSelector and/or hardwareClasses"),
    ({"aggregation": {"strategy": "FedAvg", "proximalMu": 0.1}}, "aggregation.proximalMu applies to strategy FedProx"),
    ({"localData": {"hostPath": "/var/../etc"}}, "localData.hostPath"),
])
def test_federated_spec_errors_name_the_field_and_fix(change, message):
    with pytest.raises(ValidationError) as err:
        load({"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "x"},
              "spec": spec(**change)})
    assert any(message in line for line in format_errors(err.value)), format_errors(err.value)
