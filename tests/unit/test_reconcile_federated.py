"""FederatedTraining reconciler against the in-memory writer; the server's report is played by the test."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
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


# the class of the participating node: it allows the run's data directory for NS and its toleration
EDGE_PROFILE = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "HardwareProfile", "metadata": {"name": "edge"},
                "spec": {"nodeSelector": {"matchLabels": {"edge": "yes"}}, "runtimeImage": "reg/runtime:1",
                         "target": {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime"},
                         "tolerations": [{"key": "edgefleet.io/real-node", "operator": "Exists"}],
                         "localDataPaths": [{"hostPath": "/var/lib", "namespaces": [NS]}]}}


@pytest.fixture
def kube(monkeypatch):
    fake = FakeKube()
    fake.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "inputs", "namespace": NS},
              "binaryData": {"model.onnx": base64.b64encode(fresh_head_model()).decode(),
                             "eval.npz": base64.b64encode(EVAL.read_bytes()).decode()}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"configMap": {"name": "inputs", "key": "model.onnx"}}, "format": "onnx"}})
    fake.add(EDGE_PROFILE)
    fake.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "vm", "labels": {"edge": "yes"}}})
    fake.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kwok-1", "labels": {"edge": "no"}}})
    fake.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining",
              "metadata": {"name": "ft", "namespace": NS, "uid": "1234567890", "generation": 1}, "spec": spec()})
    fake.report = None
    monkeypatch.setattr("edgefleet.reconcile.federated._report", lambda kube, settings, ft: fake.report)
    return fake


def step(kube) -> dict:
    return reconcile_federated(kube, SETTINGS, kube.get("FederatedTraining", "ft", NS))


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def client_jobs(kube) -> list[dict]:
    return [j for j in kube.list("Job", NS) if j["metadata"]["labels"]["app.kubernetes.io/component"] == "client"]


def test_federated_boundary_run_gives_each_pod_only_its_own_key_in_secrets_it_never_reads(kube):
    for verb in ("get", "list"):  # the chart lets the operator create Secrets in a user's namespace, not read them
        kube.fail(verb, "Secret", api_error(403, "secrets is forbidden", "Forbidden"))
    kube.allow("get", "Secret", SETTINGS.results_key_secret)  # its own report key, in its own namespace
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
    assert set(secret["data"]) == {"model.onnx", "eval.npz"}  # the inputs only: no key in the shared Secret
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "FederatedTraining"  # GC deletes it with the run
    tls_id = job["metadata"]["annotations"]["edgefleet.io/tls-id"]
    assert json.loads(job["metadata"]["annotations"]["edgefleet.io/clients"]) == [["vm", 0], ["vm", 1], ["vm", 2]]

    def mounted(pod) -> dict[str, set[str]]:
        return {v["secret"]["secretName"]: {i["key"] for i in v["secret"]["items"]}
                for v in pod["spec"]["volumes"] if "secret" in v}

    # the server mounts its own key and the inputs; each client its own key and the model, never the eval data
    assert mounted(job["spec"]["template"]) == {"fl-ft-run": {"model.onnx", "eval.npz"},
                                                f"fl-ft-server-tls-{tls_id}": {"ca.crt", "server.crt", "server.key"},
                                                "fl-ft-report-key": {"key"}}  # seals its report (reports.py)
    for j in jobs:
        own = f"{j['metadata']['name']}-tls-{tls_id}"
        assert mounted(j["spec"]["template"]) == {"fl-ft-run": {"model.onnx"},
                                                  own: {"ca.crt", "client.crt", "client.key"}}
    tls = {n: kube.stored("Secret", n, NS) for n in [f"fl-ft-server-tls-{tls_id}"] +
           [f"{j['metadata']['name']}-tls-{tls_id}" for j in jobs]}
    assert all(t["metadata"]["ownerReferences"][0]["kind"] == "FederatedTraining" for t in tls.values())
    assert set(tls[f"fl-ft-server-tls-{tls_id}"]["data"]) == {"ca.crt", "server.crt", "server.key"}
    keys = [t["data"].get("client.key") or t["data"]["server.key"] for t in tls.values()]
    assert len(set(keys)) == 4  # the server and each client: a key of its own
    for j in jobs:  # each client's certificate names its Job (the server names refused clients by it)
        cert = x509.load_pem_x509_certificate(base64.b64decode(
            tls[f"{j['metadata']['name']}-tls-{tls_id}"]["data"]["client.crt"]))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == j["metadata"]["name"]
    # a second step changes nothing: no Secret is made again, a lost client is not replaced by a new key
    kube.calls.clear()
    step(kube)
    assert kube.stored("Secret", "fl-ft-run", NS)["data"] == secret["data"]
    assert not [c for c in kube.calls if c[1] == "Secret"]


def test_federated_secret_that_exists_already_counts_as_made(kube):
    kube.add({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fl-ft-run", "namespace": NS},
              "data": {"ca.crt": "eA=="}})
    kube.fail("get", "Secret", api_error(403, "secrets is forbidden", "Forbidden"))
    kube.allow("get", "Secret", SETTINGS.results_key_secret)  # its own report key, in its own namespace
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
    assert failed["reason"] == "Forbidden" and "the Secrets, Service or Jobs of FederatedTraining team/ft" in \
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


def test_federated_boundary_spec_error_trim_fraction_needs_trimmed_mean():
    with pytest.raises(ValidationError) as err:
        load({"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "x"},
              "spec": spec(aggregation={"strategy": "Median", "trimFraction": 0.2})})
    assert any("aggregation.trimFraction applies to strategy TrimmedMean only" in line
               for line in format_errors(err.value))


def test_federated_boundary_server_gets_the_aggregation_and_its_bounds(kube):
    obj = kube.get("FederatedTraining", "ft", NS)
    obj["spec"]["aggregation"] = {"strategy": "TrimmedMean", "trimFraction": 0.25, "maxUpdateNorm": 2.5,
                                  "maxSamplesPerClient": 500}
    kube.add(obj)
    step(kube)
    args = kube.get("Job", "fl-ft", NS)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--aggregation=TrimmedMean", "--trim-fraction=0.25", "--max-update-norm=2.5",
            "--max-samples-per-client=500"} <= set(args)
    assert not [a for a in args if a.startswith("--proximal-mu")]


def test_federated_boundary_a_node_that_joins_later_gets_no_client(kube):
    step(kube)
    kube.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "late", "labels": {"edge": "yes"}}})
    status = step(kube)
    assert status["clients"] == 3  # the run admitted the clients it made certificates for, no more
    assert sorted(j["metadata"]["name"] for j in client_jobs(kube)) == ["fl-ft-c-vm-0", "fl-ft-c-vm-1", "fl-ft-c-vm-2"]
    # a client Job someone deleted comes back with its own Secret: the server refuses it if it had joined
    kube.delete("Job", "fl-ft-c-vm-1", NS)
    step(kube)
    job = kube.get("Job", "fl-ft-c-vm-1", NS)
    tls_id = kube.get("Job", "fl-ft", NS)["metadata"]["annotations"]["edgefleet.io/tls-id"]
    assert any(v.get("secret", {}).get("secretName") == f"fl-ft-c-vm-1-tls-{tls_id}"
               for v in job["spec"]["template"]["spec"]["volumes"])


def test_federated_boundary_too_many_clients_fail_before_any_secret(kube):
    for i in range(63):
        kube.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"n{i}", "labels": {"edge": "yes"}}})
    obj = kube.get("FederatedTraining", "ft", NS)
    obj["spec"]["participants"]["clientsPerNode"] = 16  # 64 nodes x 16 = 1,024
    kube.add(obj)
    status = step(kube)
    failed = cond(status, "Failed")
    assert failed["reason"] == "TooManyClients" and "1024 clients, over the 1000" in failed["message"]
    assert "narrow participants or lower clientsPerNode" in failed["message"]
    assert kube.list("Secret", NS) == [] and kube.list("Job", NS) == []


REFUSALS = [
    {"client": "fl-ft-c-vm-2", "reason": "UpdateTooLarge", "message": "update norm 7.5 is above the bound 0.75",
     "round": 1},
    {"client": "fl-ft-c-vm-0", "reason": "DuplicateIdentity", "message": "a second connection (from ipv4:10.0.0.9)"},
    {"client": "fl-ft-c-vm-2", "reason": "NonFinite", "message": "sent NaN or Inf parameters", "round": 2},
]


def test_federated_boundary_refused_clients_are_named_in_status_with_the_reason(kube):
    step(kube)
    kube.report = {"state": "Running", "startAccuracy": 0.09, "refusedClients": REFUSALS[:2], "rounds": [
        {"round": 1, "clients": 2, "failures": 0, "loss": 1.2, "accuracy": 0.7, "refused": ["fl-ft-c-vm-2"]}]}
    status = step(kube)
    assert status["rounds"][0]["refused"] == 1
    assert status["refusedClients"] == [
        {"client": "fl-ft-c-vm-2", "reason": "UpdateTooLarge", "message": REFUSALS[0]["message"], "round": 1,
         "count": 1},
        {"client": "fl-ft-c-vm-0", "reason": "DuplicateIdentity", "message": REFUSALS[1]["message"], "count": 1}]
    refused = cond(status, "ClientsRefused")
    assert refused["status"] == "True" and refused["reason"] == "UpdatesRefused"
    assert "fl-ft-c-vm-2: UpdateTooLarge in round 1; fl-ft-c-vm-0: DuplicateIdentity" in refused["message"]
    assert [w["reason"] for w in kube.warnings()] == ["UpdatesRefused"]
    # the next round refuses vm-2 again: the entry keeps the latest reason and counts; no second event
    kube.report = {**kube.report, "refusedClients": REFUSALS, "state": "Failed", "reason": "RoundFailed",
                   "message": "round 2: 1 clients returned an update, 1 refused (fl-ft-c-vm-2: NonFinite), 0 failed; "
                              "the minimum is 2"}
    status = step(kube)
    vm2 = next(x for x in status["refusedClients"] if x["client"] == "fl-ft-c-vm-2")
    assert (vm2["reason"], vm2["round"], vm2["count"]) == ("NonFinite", 2, 2)
    assert cond(status, "Failed")["reason"] == "RoundFailed"
    assert cond(status, "ClientsRefused")["status"] == "True"  # the failed run still names them
    assert [w["reason"] for w in kube.warnings()] == ["UpdatesRefused", "RoundFailed"]


def test_federated_boundary_report_refusals_are_bounded_and_sanitised(kube):
    step(kube)
    kube.report = {"state": "Running", "rounds": [], "refusedClients": [
        "not a dict", {"reason": "NoClient"}, {"client": "x" * 400, "reason": "R" * 100, "message": "m" * 5000,
                                              "round": -3}]}
    status = step(kube)
    [entry] = status["refusedClients"]
    assert len(entry["client"]) == 253 and len(entry["reason"]) == 64 and len(entry["message"]) == 1024
    assert "round" not in entry
