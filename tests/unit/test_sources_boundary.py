"""User sources are hostile: each read the operator does for a user (EdgeModel sources in the inline compile,
FederatedTraining URIs, drift scrapes) ends at its size cap or deadline, follows no redirect that lowers
security, never carries the operator's credentials, and says which limit it hit. Real loopback servers
(tests/hostile_http.py), the in-memory fake of the one writer for the reconcilers."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.parse

import pytest
import yaml
from edgefleet.api import EdgeDeployment, EdgeModel, builtin_profiles, format_errors
from edgefleet.api.crdgen import render_all
from edgefleet.api.federated import FederatedTraining
from edgefleet.api.models import DataRef
from edgefleet.artifacts import StoreError, own_store
from edgefleet.compiler import CompileError, CompileRequest
from edgefleet.compiler.core import fetch_source
from edgefleet.federated_tls import make_bundle
from edgefleet.reconcile import World, reconcile_model
from edgefleet.reconcile.drift import READ_DEADLINE_SECONDS, read_pods
from edgefleet.reconcile.federated import RunFailed, _bytes_of
from edgefleet.settings import Settings
from edgefleet_runtime.bounded import Limits, read_all
from edgefleet_runtime.fetch import FetchError, FetchLimit, read_source
from fake_kube import FakeKube
from hostile_http import MODEL, serve
from pydantic import ValidationError

NS = "t"
MODEL_DIGEST = "sha256:" + __import__("hashlib").sha256(MODEL).hexdigest()


@pytest.fixture
def tls(tmp_path, monkeypatch):
    """A certificate for localhost, trusted by requests through REQUESTS_CA_BUNDLE (spawned compiles inherit it)."""
    bundle = make_bundle("sources", ["localhost"], {})
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    cert.write_bytes(bundle.server.cert)
    key.write_bytes(bundle.server.key)
    ca.write_bytes(bundle.ca_cert)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    return cert, key


# ---------------------------------------------------------------- one read: size cap, deadline, redirects
def test_boundary_a_trickling_source_fails_at_its_deadline_naming_it():
    with serve() as server:
        started = time.monotonic()
        with pytest.raises(FetchLimit) as err:
            read_source(server.url("/trickle"), Limits(max_bytes=10 << 20, deadline_seconds=1.5), insecure=True)
        took = time.monotonic() - started
    assert err.value.limit == "deadline"
    assert "deadline of 1.5 s" in str(err.value)
    assert 1.4 <= took < 2.5, f"the trickle ended after {took:.2f} s, not at its 1.5 s deadline"


def test_boundary_a_source_that_never_ends_fails_at_its_size_cap_or_its_deadline():
    with serve() as server:
        started = time.monotonic()
        with pytest.raises(FetchLimit) as err:
            read_source(server.url("/endless"), Limits(max_bytes=1 << 20, deadline_seconds=30), insecure=True)
        assert err.value.limit == "size" and f"size cap of {1 << 20} bytes" in str(err.value)
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(FetchLimit) as err:
            read_source(server.url("/endless"), Limits(max_bytes=1 << 40, deadline_seconds=1.0), insecure=True)
        took = time.monotonic() - started
    assert err.value.limit == "deadline" and 0.9 <= took < 2.0, took


def test_boundary_a_server_that_never_answers_fails_at_the_deadline_not_the_read_timeout():
    with serve() as server:
        started = time.monotonic()
        with pytest.raises(FetchLimit) as err:
            read_source(server.url("/slow-headers"), Limits(max_bytes=1 << 20, deadline_seconds=1.0), insecure=True)
        took = time.monotonic() - started
    assert err.value.limit == "deadline" and took < 2.0, took


def test_boundary_https_redirect_to_http_is_refused_before_any_plain_request(tls):
    with serve() as plain, serve(tls) as secure:
        target = plain.url("/model")
        with pytest.raises(FetchLimit) as err:
            read_source(secure.url(f"/redirect?to={target}", host="localhost"),
                        Limits(max_bytes=1 << 20, deadline_seconds=5))
        assert err.value.limit == "redirect"
        assert "from https to http" in str(err.value)
        assert plain.seen == []  # nothing went out in the clear
        # the same server, redirecting within https, is followed
        assert read_source(secure.url(f"/redirect?to={secure.url('/model', 'localhost')}", host="localhost"),
                           Limits(max_bytes=1 << 20, deadline_seconds=5)) == MODEL


def test_boundary_credentials_never_follow_a_redirect_to_another_host():
    with serve() as server:
        elsewhere = server.url("/model", host="localhost")  # another host name for the same socket
        body = read_all(server.url(f"/redirect?to={elsewhere}"), Limits(1 << 20, 5),
                        headers={"Authorization": "Basic b3BlcmF0b3I6c2VjcmV0"}, allow_plain_http=True)
    assert body == MODEL
    first, second = server.seen
    assert first["authorization"] == "Basic b3BlcmF0b3I6c2VjcmV0" and first["host"].startswith("127.0.0.1")
    assert second["host"].startswith("localhost") and second["authorization"] is None


def test_boundary_redirect_loops_end_at_the_redirect_limit():
    with serve() as server:
        twice = server.url("/redirect?to=" + urllib.parse.quote("/redirect?to=/model"))
        with pytest.raises(FetchLimit) as err:
            read_source(twice, Limits(max_bytes=1 << 20, deadline_seconds=5, max_redirects=1), insecure=True)
    assert err.value.limit == "redirect" and "more than 1 redirects" in str(err.value)


# ---------------------------------------------------------------- credentials: the operator's stay home
def test_boundary_a_registry_a_user_names_never_receives_credentials(tmp_path, monkeypatch):
    """The process has a pull secret for the registry (as the operator's environment might): a user's oci://
    source is still read anonymously, so a registry that asks for credentials gets none."""
    with serve() as registry:
        host = f"127.0.0.1:{registry.port}"
        docker = tmp_path / ".docker"  # where ORAS looks for pull secrets
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps(
            {"auths": {host: {"auth": base64.b64encode(b"operator:secret").decode()}}}))
        monkeypatch.setenv("HOME", str(tmp_path))
        with pytest.raises(FetchError):
            read_source(f"oci://{host}/models/digits:v1", Limits(1 << 20, 5))
    assert registry.seen, "the registry was asked"
    assert all(s["authorization"] is None for s in registry.seen), registry.seen


def test_tenant_federated_inputs_never_carry_the_operators_store_credentials():
    """A FederatedTraining's evaluation URI on a host the user chose, even the operator's own store host: the
    operator's username and password are not sent, and the run fails naming the field."""
    with serve() as registry:
        host = f"127.0.0.1:{registry.port}"
        settings = Settings(artifact_store=f"oci://{host}/edgefleet", artifact_username="operator",
                            artifact_password="secret", source_deadline_seconds=5)
        ref = DataRef(uri=f"oci://{host}/edgefleet/compiled:digits")
        with pytest.raises(RunFailed) as err:
            _bytes_of(FakeKube(), settings, NS, ref, "spec.evaluation.data")
    assert err.value.reason == "InputUnavailable" and err.value.message.startswith("spec.evaluation.data: ")
    assert "readable without credentials" in err.value.message
    assert all(s["authorization"] is None for s in registry.seen), registry.seen


def test_tenant_federated_input_that_trickles_fails_the_run_naming_the_limit(tls):
    with serve(tls) as server:
        settings = Settings(source_deadline_seconds=1.0)
        started = time.monotonic()
        with pytest.raises(RunFailed) as err:
            _bytes_of(FakeKube(), settings, NS, DataRef(uri=server.url("/trickle", host="localhost")),
                      "spec.evaluation.data")
        assert time.monotonic() - started < 2.0
    assert err.value.reason == "InputLimitExceeded"
    assert "deadline of 1 s" in err.value.message and "EDGEFLEET_SOURCE_DEADLINE_SECONDS" in err.value.message


def test_boundary_the_operators_store_credentials_go_to_its_own_registry_only():
    with pytest.raises(StoreError, match="not in the operator's artifact store"):
        own_store("oci://store.local:5000/edgefleet", "oci://attacker.example/edgefleet/compiled:x",
                  username="operator", password="secret")
    with pytest.raises(StoreError, match="not in the operator's artifact store"):  # a port is another registry
        own_store("oci://store.local:5000/edgefleet", "oci://store.local:5001/edgefleet/x:y", username="operator")
    store = own_store("oci://store.local:5000/edgefleet", "oci://store.local:5000/edgefleet/compiled:x")
    assert store.registry == "store.local:5000"


# ---------------------------------------------------------------- the source cache: bytes by digest alone? never
def test_tenant_source_cache_never_hands_out_bytes_by_declared_digest_alone(tmp_path):
    with serve() as server:
        owner = CompileRequest(source=server.url("/model"), targets={}, digest=MODEL_DIGEST)
        assert fetch_source(owner, tmp_path) == (MODEL, MODEL_DIGEST)
        asked = len(server.seen)
        # another namespace knows the digest and names a URI that does not deliver those bytes
        other = CompileRequest(source=server.url("/missing"), targets={}, digest=MODEL_DIGEST)
        with pytest.raises(CompileError) as err:
            fetch_source(other, tmp_path)
        assert err.value.reason == "SourceUnavailable" and "HTTP 404" in err.value.message
        assert len(server.seen) == asked + 1  # it was really asked, and said no
        # the owner's own URI still hits the cache: no request
        assert fetch_source(owner, tmp_path) == (MODEL, MODEL_DIGEST)
        assert len(server.seen) == asked + 1


# ---------------------------------------------------------------- reaching the user: the EdgeModel's status
@pytest.mark.parametrize("route, limit, words", [
    ("/trickle", "deadline", "deadline of 2 s"),
    ("/redirect?to=http://127.0.0.1:9/model", "redirect", "from https to http"),
])
def test_tenant_inline_compile_source_limit_reaches_the_status(tls, tmp_path, route, limit, words):
    with serve(tls) as server:
        kube = FakeKube()
        kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
                  "metadata": {"name": "digits", "namespace": NS, "generation": 1},
                  "spec": {"source": {"uri": server.url(route, host="localhost")}, "format": "onnx",
                           "targetProfiles": {"names": ["cpu-amd64"]}}})
        settings = Settings(compile_executor="inline", artifact_store=str(tmp_path / "store"),
                            compile_cache=tmp_path / "cache", source_deadline_seconds=2)
        started = time.monotonic()
        reconcile_model(kube, settings, NS, "digits", World({}, builtin_profiles()))
        took = time.monotonic() - started
    status = kube.stored("EdgeModel", "digits", NS)["status"]
    (variant,) = status["variants"]
    assert (variant["state"], variant["reason"]) == ("Failed", "SourceLimitExceeded")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "SourceLimitExceeded"
    assert words in degraded["message"] and "Fix:" in degraded["message"]
    assert [e["reason"] for e in kube.warnings()] == ["SourceLimitExceeded"]
    assert took < 30, f"the reconcile took {took:.1f} s"  # a 2 s deadline plus a compile process's start


# ---------------------------------------------------------------- drift scrapes: the pods are the user's
def deployment(port: int, pods: int) -> EdgeDeployment:
    return EdgeDeployment.model_validate({
        "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment", "metadata": {"name": "d", "namespace": NS},
        "spec": {"modelRef": {"name": "m"}, "runtime": {"port": port},
                 "monitoring": {"drift": {"maxPodsPerClass": pods}}}})


def pods(n: int) -> list[dict]:
    return [{"metadata": {"name": f"d-{i:02d}", "labels": {"edgefleet.io/profile": "cpu-amd64"}},
             "spec": {"nodeName": f"n-{i}"},
             "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}
            for i in range(n)]


@pytest.mark.parametrize("behaviour, words", [
    ("redirect", "redirects are not followed"),
    ("trickle", "deadline of 2 s"),
    ("endless", f"size cap of {4 << 20} bytes"),
    ("secret-page", "answered HTTP 500"),
    ("secret-text", "not Prometheus text"),
])
def test_boundary_drift_scrape_of_a_hostile_pod_ends_and_never_quotes_it(behaviour, words):
    with serve() as server:
        server.metrics = behaviour
        started = time.monotonic()
        (read,) = read_pods(pods(1), deployment(server.port, 1))["cpu-amd64"]
        took = time.monotonic() - started
    assert words in read.error, read.error
    assert "internal-secret-token" not in read.error
    assert took < 3.0, f"{behaviour}: {took:.1f} s"
    assert [s["path"] for s in server.seen] == ["/metrics"]  # a redirect is not followed


def test_boundary_slow_pods_hold_a_drift_read_for_its_deadline_at_most():
    with serve() as server:
        server.metrics = "trickle"
        started = time.monotonic()
        read = read_pods(pods(30), deployment(server.port, 30))["cpu-amd64"]
        took = time.monotonic() - started
    assert took < READ_DEADLINE_SECONDS + 1, f"30 slow pods held the reconcile {took:.1f} s"
    assert len(read) == 30 and all(p.error for p in read)
    late = [p for p in read if "drift read's deadline" in p.error]
    assert late and len(late) < 30  # the first ones were read and timed out on their own, the rest not started


# ---------------------------------------------------------------- admission: no credentials in any URI
BAD_URIS = ["https://user:pass@models.example/digits.onnx", "oci://robot@registry.example/models/digits:v1",
            "https://token@models.example/x.onnx"]
GOOD_URIS = ["oci://registry.example/models/digits@sha256:" + "a" * 64, "https://models.example/x.onnx?a=b@c",
             "pvc://claim/data/eval.npz"]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_boundary_uris_with_credentials_are_refused_naming_the_field_and_the_fix(uri):
    model = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": "m"},
             "spec": {"source": {"uri": uri}, "format": "onnx",
                      "optimization": {"quantization": "static-int8", "calibration": {"uri": uri},
                                       "evaluation": {"uri": uri}}}}
    with pytest.raises(ValidationError) as err:
        EdgeModel.model_validate(model)
    lines = format_errors(err.value)
    assert {line.split(":")[0] for line in lines} == {
        "spec.source.uri", "spec.optimization.calibration.uri", "spec.optimization.evaluation.uri"}
    assert all("must not carry credentials" in line and "ConfigMap" in line for line in lines)
    ft = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "f"},
          "spec": {"sourceModel": {"name": "m"}, "targetModel": {"name": "m"},
                   "participants": {"hardwareClasses": ["cpu-amd64"]}, "localData": {"hostPath": "/data"},
                   "evaluation": {"data": {"uri": uri}}}}
    with pytest.raises(ValidationError) as err:
        FederatedTraining.model_validate(ft)
    assert [line.split(":")[0] for line in format_errors(err.value)] == ["spec.evaluation.data.uri"]


def _uri_rules(node, path=""):
    """(path, CEL rules) of every property named uri in a schema."""
    for key, child in (node.get("properties") or {}).items():
        if key == "uri":
            yield f"{path}.{key}", [v["rule"] for v in child.get("x-kubernetes-validations", [])]
        yield from _uri_rules(child, f"{path}.{key}")
    if "items" in node:
        yield from _uri_rules(node["items"], path + "[]")


def test_boundary_every_uri_field_of_the_crds_carries_the_credentials_rule():
    found = {}
    for name, text in render_all().items():
        schema = yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        found.update({f"{name}{p}": rules for p, rules in _uri_rules(schema)})
    assert {"edgemodels.edgefleet.io.yaml.spec.source.uri",
            "edgemodels.edgefleet.io.yaml.spec.optimization.evaluation.uri",
            "federatedtrainings.edgefleet.io.yaml.spec.evaluation.data.uri"} <= set(found)
    for where, rules in found.items():
        (rule,) = [r for r in rules if "@" in r]
        pattern = re.fullmatch(r"!self\.matches\(r'(.*)'\)", rule).group(1)  # RE2 and re agree on this one
        assert all(re.search(pattern, u) for u in BAD_URIS), where
        assert not any(re.search(pattern, u) for u in GOOD_URIS), where
