"""The artifact store's token service (edgefleet.registry_token): who gets which actions on which repository, and
tokens the registry can verify. The TokenReview is the API server's answer as a dict; the cluster tests
(tests/integration/test_registry_auth.py) run it against the real API server and registry."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request

import jwt
import pytest
from edgefleet.registry_token import (
    ANONYMOUS,
    Identity,
    Policy,
    PolicyFile,
    Refused,
    TokenService,
    jwks,
    new_key,
    serve,
    service_account_identity,
)

RULES = PolicyFile.model_validate({
    "rules": [
        {"serviceAccount": "edgefleet-system/edgefleet-jobs", "repositories": ["edgefleet/models"],
         "actions": ["pull", "push"]},
        {"serviceAccount": "*/*", "requireNode": True, "repositories": ["edgefleet/tenants/{namespace}"],
         "actions": ["push"]},
    ]})
POLICY = Policy(frozenset(RULES.anonymous), frozenset({"127.0.0.1"}), tuple(RULES.rules))
JOBS = Identity("system:serviceaccount:edgefleet-system:edgefleet-jobs", "edgefleet-system", "edgefleet-jobs")
TENANT_POD = Identity("system:serviceaccount:t:default", "t", "default", node="edge-1")
PUSH = "repository:edgefleet/models:pull,push"


def test_boundary_anonymous_callers_pull_and_never_push():
    assert POLICY.grant(ANONYMOUS, [PUSH]) == [{"type": "repository", "name": "edgefleet/models", "actions": ["pull"]}]


def test_boundary_each_service_account_pushes_only_where_the_policy_names_it():
    assert POLICY.grant(JOBS, [PUSH])[0]["actions"] == ["pull", "push"]
    assert POLICY.grant(TENANT_POD, [PUSH])[0]["actions"] == ["pull"]  # a tenant's pod never the model store
    # a token for a repository carries pull and push wherever the caller may take them (ORAS reuses its first)
    assert POLICY.grant(TENANT_POD, ["repository:edgefleet/tenants/t:pull"])[0]["actions"] == ["pull", "push"]
    other = POLICY.grant(TENANT_POD, ["repository:edgefleet/tenants/other:push"])
    assert other[0]["actions"] == ["pull"]  # nor another namespace's: it reads there what anyone reads
    unbound = Identity(TENANT_POD.subject, "t", "default")  # a token not bound to a pod on a node
    assert POLICY.grant(unbound, ["repository:edgefleet/tenants/t:push"])[0]["actions"] == ["pull"]


def test_boundary_scopes_other_than_repositories_and_actions_not_granted_get_nothing():
    assert POLICY.grant(JOBS, ["registry:catalog:*"]) == []
    assert POLICY.grant(JOBS, ["repository:edgefleet/models:delete"])[0]["actions"] == ["pull", "push"]
    assert POLICY.grant(ANONYMOUS, ["repository:edgefleet/models:delete"])[0]["actions"] == ["pull"]


def test_boundary_token_review_decides_the_identity_and_refuses_what_does_not_verify():
    status = {"authenticated": True, "audiences": ["edgefleet-registry"],
              "user": {"username": "system:serviceaccount:t:default",
                       "extra": {"authentication.kubernetes.io/node-name": ["edge-1"]}}}
    assert service_account_identity(status, "edgefleet-registry") == TENANT_POD
    with pytest.raises(Refused):
        service_account_identity({**status, "authenticated": False}, "edgefleet-registry")
    with pytest.raises(Refused):
        service_account_identity({**status, "audiences": ["kubernetes"]}, "edgefleet-registry")
    with pytest.raises(Refused, match="only ServiceAccount"):
        service_account_identity({**status, "user": {"username": "alice"}}, "edgefleet-registry")


@pytest.fixture
def token_server():
    reviews: list[str] = []

    def review(token: str, audience: str) -> dict:
        reviews.append(token)
        if token != "good":
            return {"authenticated": False}
        return {"authenticated": True, "audiences": [audience],
                "user": {"username": "system:serviceaccount:edgefleet-system:edgefleet-jobs"}}

    key = new_key()
    service = TokenService(key, "edgefleet-registry", "edgefleet", POLICY, review)
    server = serve(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/token", key, reviews
    server.shutdown()
    server.server_close()


def _get(url: str, user: str | None = None, password: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _access(token: str, key: bytes) -> list[dict]:
    public = jwt.PyJWKSet.from_dict(jwks(key)).keys[0]
    header = jwt.get_unverified_header(token)
    assert header["kid"] == public.key_id
    return jwt.decode(token, public.key, algorithms=["ES256"], audience="edgefleet-registry",
                      issuer="edgefleet")["access"]


def test_boundary_token_server_grants_by_verified_identity_and_refuses_bad_credentials(token_server):
    url, key, reviews = token_server
    query = f"{url}?service=edgefleet-registry&scope={PUSH}"
    status, body = _get(query, "serviceaccount", "good")
    assert status == 200 and _access(body["token"], key)[0]["actions"] == ["pull", "push"]
    # loopback is the policy's trusted address here: the anonymous answer from it is everything asked for
    status, body = _get(query)
    assert status == 200 and _access(body["token"], key)[0]["actions"] == ["pull", "push"]
    # credentials that do not verify are refused, never treated as anonymous
    assert _get(query, "serviceaccount", "forged")[0] == 401
    assert _get(query, "operator", "secret")[0] == 401
    assert reviews == ["good", "forged"]  # an unknown username never reaches the API server
    assert _get(f"{url}?service=another&scope={PUSH}")[0] == 400
