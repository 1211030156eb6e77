"""The artifact store with token authentication: a real CNCF distribution registry whose tokens come from
`edgefleet registry-token-server` (edgefleet.registry_token), which verifies ServiceAccount tokens with the real
API server (TokenReview). Clients are the project's own (OCIStore / edgefleet_runtime.fetch.registry_client),
with the credentials the operator renders into its pods (a projected token: EDGEFLEET_REGISTRY_TOKEN_FILE)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml
from edgefleet.artifacts import OCIStore, StoreError, pod_store
from edgefleet.registry_token import Policy, PolicyFile, TokenService, jwks, kubernetes_reviewer, new_key, serve
from edgefleet_dev import toolchain
from edgefleet_dev.net import free_port
from edgefleet_runtime.fetch import SERVICE_ACCOUNT_USER, TOKEN_FILE_ENV
from kube_helpers import wait_for

pytestmark = pytest.mark.cluster
SERVICE = "edgefleet-registry"
MEDIA = "application/vnd.edgefleet.model.onnx"


@pytest.fixture(scope="module")
def jobs_namespace(cluster):
    name = f"op-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("create", "serviceaccount", "edgefleet-jobs", "-n", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def registry(cluster, jobs_namespace, tmp_path_factory):
    """host:port of a registry that needs a token for everything; tokens from our token service."""
    state = tmp_path_factory.mktemp("registry")
    rules = PolicyFile.model_validate({"rules": [
        {"serviceAccount": f"{jobs_namespace}/edgefleet-jobs", "repositories": ["edgefleet/models"],
         "actions": ["pull", "push"]},
        {"serviceAccount": "*/*", "requireNode": True, "repositories": ["edgefleet/tenants/{namespace}"],
         "actions": ["pull", "push"]},
    ]}).rules
    key = new_key()
    tokens = TokenService(key, SERVICE, "edgefleet", Policy(rules=tuple(rules)),
                          kubernetes_reviewer(str(cluster.kubeconfig)))
    token_server = serve(tokens, "127.0.0.1", 0)
    threading.Thread(target=token_server.serve_forever, daemon=True).start()
    (state / "jwks.json").write_text(json.dumps(jwks(key)))
    port = free_port()
    (state / "config.yaml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(state / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
        "auth": {"token": {"realm": f"http://127.0.0.1:{token_server.server_address[1]}/token",
                           "service": SERVICE, "issuer": "edgefleet", "jwks": str(state / "jwks.json")}},
    }))
    log = (state / "registry.log").open("wb")
    proc = subprocess.Popen([str(toolchain.binary_path("registry")), "serve", str(state / "config.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env={"OTEL_TRACES_EXPORTER": "none"})
    try:
        wait_for(lambda: _status(f"http://127.0.0.1:{port}/v2/") == 401, 30, 0.2,
                 f"the registry to ask for a token (log: {state / 'registry.log'})")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        token_server.shutdown()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:  # not listening yet
        return 0


def _token(cluster, namespace: str, account: str, *bound: str, audience: str = SERVICE) -> str:
    args = ["create", "token", account, "-n", namespace, f"--audience={audience}", "--duration=10m", *bound]
    return cluster.kubectl(*args).stdout.strip()


def _put(registry: str, repository: str, login: tuple[str, str] | None = None) -> str:
    data = uuid.uuid4().bytes * 64
    store = OCIStore(registry, repository, insecure=True, username=login[0] if login else None,
                     password=login[1] if login else None)
    return store.put(data, name="m", media_type=MEDIA).ref


@pytest.fixture(scope="module")
def pod_on_a_node(cluster):
    """A pod of a tenant namespace bound to a (kwok) node: its tokens carry that node's name."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0, 30, 0.2,
             "the default ServiceAccount")
    real = (cluster.real_node or {}).get("name")
    names = cluster.kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    node = next(n for n in names if n != real)  # a kwok node: the pod is only bound, never run
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": name},
           "spec": {"nodeName": node, "automountServiceAccountToken": False,
                    "containers": [{"name": "c", "image": "example.invalid/none:1"}]}}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_boundary_anonymous_clients_pull_and_never_push(cluster, registry, jobs_namespace):
    login = (SERVICE_ACCOUNT_USER, _token(cluster, jobs_namespace, "edgefleet-jobs"))
    ref = _put(registry, "edgefleet/models", login)
    store = OCIStore(registry, "edgefleet/models", insecure=True)
    assert store.get(ref, "")  # anonymous pull
    with pytest.raises(StoreError, match="401|authentication"):
        _put(registry, "edgefleet/models")


def test_boundary_the_jobs_token_pushes_the_model_store_and_nothing_else(cluster, registry, jobs_namespace,
                                                                        tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text(_token(cluster, jobs_namespace, "edgefleet-jobs"))
    monkeypatch.setenv(TOKEN_FILE_ENV, str(token))  # what the operator renders into compile and bench Jobs
    ref = pod_store(f"oci://{registry}/edgefleet/models").put(b"variant" * 100, name="v", media_type=MEDIA)
    assert ref.ref.startswith(f"oci://{registry}/edgefleet/models@sha256:")
    with pytest.raises(StoreError):
        pod_store(f"oci://{registry}/edgefleet/tenants/{jobs_namespace}").put(b"x" * 10, name="v", media_type=MEDIA)


def test_tenant_pod_token_pushes_only_its_own_namespace_repository(cluster, registry, pod_on_a_node):
    ns = pod_on_a_node
    token = _token(cluster, ns, "default", "--bound-object-kind=Pod", "--bound-object-name=p")
    login = (SERVICE_ACCOUNT_USER, token)
    assert "@sha256:" in _put(registry, f"edgefleet/tenants/{ns}", login)
    with pytest.raises(StoreError):
        _put(registry, "edgefleet/models", login)  # the fleet's model store: never a tenant's pod
    with pytest.raises(StoreError):
        _put(registry, "edgefleet/tenants/someone-else", login)
    unbound = (SERVICE_ACCOUNT_USER, _token(cluster, ns, "default"))  # not a pod on a node: no tenant pushes
    with pytest.raises(StoreError):
        _put(registry, f"edgefleet/tenants/{ns}", unbound)


def test_boundary_tokens_for_another_audience_or_forged_are_refused(cluster, registry, jobs_namespace):
    api_token = _token(cluster, jobs_namespace, "edgefleet-jobs", audience="https://kubernetes.default.svc")
    for password in (api_token, "forged." + api_token[7:]):
        with pytest.raises(StoreError):
            _put(registry, "edgefleet/models", (SERVICE_ACCOUNT_USER, password))
    started = time.monotonic()
    with pytest.raises(StoreError):
        _put(registry, "edgefleet/models", ("admin", "admin"))  # no static users at all
    assert time.monotonic() - started < 30  # refused, not retried until a deadline
