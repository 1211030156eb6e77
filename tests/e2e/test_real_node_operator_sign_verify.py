"""A variant with no trusted signature, refused on the dev cluster's real node while the operator serves the class.

The operator runs in this process, watching only this module's namespace, with the inline compiler signing what it
publishes (EDGEFLEET_SIGNING_KEY_FILE). It serves the quickstart on the real node under an EdgeDeployment with
spec.trust.publicKeysSecret. Then the EdgeModel's status is made to name a variant pushed by hand (a valid digest,
no signature), as whoever can edit that status could: the operator rolls the class to it, the fetch init container
refuses it, and the operator posts a Warning event and the Degraded condition with the fix while the old pod keeps
answering through the Service. A correctly signed hand-pushed variant then rolls out through the Service with no
request lost (the runtime keeps serving --shutdown-delay seconds after SIGTERM).

Traffic goes only to the registry and the pods this module creates; every wait and loop is bounded."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kube_helpers import condition, get, items, wait_for
from operator_helpers import quickstart_into
from real_node_helpers import (
    TAINT_KEY,
    Tally,
    eval_set,
    events_for,
    infer_one,
    real_node_class,
    real_pods,
    serving_pod,
    tolerating_real_node,
)
from test_real_node_on_target import _kept_tolerating

pytestmark = pytest.mark.cluster

ONNX = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "digits_cnn.onnx"
REFUSED = "VariantSignatureRefused"


def _unique_model() -> bytes:
    """The quickstart model with a doc string of its own: a digest no other test's cache entry shares."""
    import onnx

    model = onnx.load(str(ONNX))
    model.doc_string = f"trust operator e2e {uuid.uuid4()}"
    return model.SerializeToString()


@pytest.fixture(scope="module")
def operated(cluster, real_node, tmp_path_factory):
    """The quickstart served on the real node by the operator in a thread, signatures required."""
    from edgefleet.artifacts import open_store
    from edgefleet_dev.net import free_port
    from edgefleet_runtime import trust
    from kopf.testing import KopfRunner

    keys = tmp_path_factory.mktemp("trust-op-keys")
    for name in ("team", "other"):
        private, public = trust.generate_signing_key()
        (keys / f"{name}.key").write_bytes(private)
        (keys / f"{name}.pub").write_bytes(public)
    namespace = f"rn-trop-{uuid.uuid4().hex[:8]}"  # rn-*: the session's operator leaves it to this one
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("create", "secret", "generic", "team-keys", "-n", namespace,
                    f"--from-file=team.pub={keys / 'team.pub'}")
    profile = real_node_class(cluster)
    store = f"oci://{cluster.pod_registry}/edgefleet-trust-op/{namespace}"  # the host and the node's pods reach it
    env = {"KUBECONFIG": str(cluster.kubeconfig), "EDGEFLEET_NAMESPACE": namespace,
           "EDGEFLEET_ARTIFACT_STORE": store, "EDGEFLEET_ARTIFACT_INSECURE": "true",
           "EDGEFLEET_SIGNING_KEY_FILE": str(keys / "team.key"), "EDGEFLEET_NODE_CACHE": cluster.real_node["nodeCache"],
           "EDGEFLEET_RESYNC_SECONDS": "20", "EDGEFLEET_COMPILE_TIMING_RUNS": "10",
           "EDGEFLEET_METRICS_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tolerating_real_node(cluster, profile), _kept_tolerating(cluster, profile), KopfRunner(
                ["run", "--standalone", "-n", namespace, "-m", "edgefleet.handlers"], timeout=60):
            ctx = {"namespace": namespace, "profile": profile, "keys": keys,
                   "store": open_store(f"{store}/by-hand", True), "cache": Path(cluster.real_node["nodeCache"])}
            ctx["signed"] = _serve(cluster, ctx)
            yield ctx
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _serve(cluster, ctx) -> dict:
    ns, profile = ctx["namespace"], ctx["profile"]
    quickstart_into(cluster, ns)
    cluster.kubectl("patch", "edgemodel", "digits", "-n", ns, "--type=merge", "-p", json.dumps(
        {"spec": {"targetProfiles": {"names": [profile]}, "optimization": {"quantization": "none",
                                                                          "selection": "host"}}}))
    cluster.kubectl("patch", "edgedeployment", "digits", "-n", ns, "--type=merge", "-p", json.dumps(
        {"spec": {"nodeSelector": {"matchLabels": {TAINT_KEY: "true"}},
                  "trust": {"publicKeysSecret": "team-keys", "requireSignature": True}}}))
    variant = wait_for(lambda: next((v for v in get(cluster, ns, "edgemodel", "digits").get(
        "status", {}).get("variants", []) if v["profile"] == profile and v.get("state") == "Ready"), None),
        420, 2, f"the {profile} variant compiled and signed by the operator")
    wait_for(lambda: serving_pod(cluster, ns, profile, variant["digest"]), 300, 1,
             lambda: f"the signed variant served on the real node; pods {_pod_states(cluster, ctx)}")
    return variant


def _pod_states(cluster, ctx) -> list:
    return [(p["metadata"]["name"], p["status"].get("phase"),
             (p["metadata"].get("annotations") or {}).get("edgefleet.io/variant-digest", "")[:19])
            for p in items(cluster, ctx["namespace"], "pods")]


def _push(ctx, data: bytes, key: str | None) -> dict:
    """Push bytes by hand, signed with keys/<key>.key (None: unsigned); returns artifact and digest."""
    from edgefleet_runtime import trust

    annotations = {}
    if key:
        signing_key = trust.load_signing_key(ctx["keys"] / f"{key}.key")
        annotations[trust.SIGNATURE_ANNOTATION] = trust.sign_digest(
            signing_key, "sha256:" + hashlib.sha256(data).hexdigest())
    ref = ctx["store"].put(data, name="digits", media_type="application/octet-stream", annotations=annotations,
                           filename="model.onnx")
    return {"artifact": ref.ref, "digest": ref.digest}


def _point_status_at(cluster, ctx, variant: dict) -> None:
    """Edit the EdgeModel's status so the class's Ready variant is `variant` (the model reconciler leaves a status
    of the current generation alone; the status change queues the EdgeDeployment)."""
    ns = ctx["namespace"]
    variants = get(cluster, ns, "edgemodel", "digits")["status"]["variants"]
    i = next(i for i, v in enumerate(variants) if v["profile"] == ctx["profile"])
    patch = [{"op": "replace", "path": f"/status/variants/{i}/{k}", "value": variant[k]}
             for k in ("artifact", "digest")]
    cluster.kubectl("patch", "edgemodel", "digits", "-n", ns, "--subresource=status", "--type=json", "-p",
                    json.dumps(patch))


class ServiceCounter(threading.Thread):
    """Requests through the deployment's Service until stopped (bounded): every answer's version, every failure."""

    def __init__(self, cluster, namespace: str, limit: int = 20000):
        super().__init__(daemon=True)
        service = get(cluster, namespace, "service", "digits")["spec"]
        self.host, self.port = service["clusterIP"], service["ports"][0]["port"]
        self.limit, self.stop, self.tally = limit, threading.Event(), Tally()
        self.image = eval_set(1)[0][0]

    def run(self) -> None:
        while not self.stop.is_set() and self.tally.sent < self.limit:
            infer_one(self.host, self.port, self.image, self.tally, timeout=5)
            time.sleep(0.02)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(30)


def _refused_in_status(cluster, ctx, digest: str):
    """The live Degraded condition once it says the class's new variant was refused, and the pod it was."""
    def check():
        ed = get(cluster, ctx["namespace"], "edgedeployment", "digits")
        degraded = condition(ed, "Degraded")
        pods = [p for p in real_pods(cluster, ctx["namespace"], ctx["profile"])
                if p["metadata"]["annotations"].get("edgefleet.io/variant-digest") == digest]
        if degraded and degraded["status"] == "True" and degraded["reason"] == REFUSED and pods:
            return ed, degraded, pods[0]
        return None
    return check


def _warnings(cluster, ctx) -> list[dict]:
    return [e for e in events_for(cluster, ctx["namespace"], "digits")
            if e["involvedObject"]["kind"] == "EdgeDeployment" and e["type"] == "Warning" and e["reason"] == REFUSED]


def _version(digest: str) -> str:
    """The model_version the runtime answers with."""
    return digest.split(":")[1][:12]


def test_real_node_operator_verify_refuses_an_unsigned_variant_with_event_and_condition_and_keeps_serving(
        cluster, operated):
    ns, profile, signed = operated["namespace"], operated["profile"], operated["signed"]
    old = wait_for(lambda: serving_pod(cluster, ns, profile, signed["digest"]), 120, 1, "the signed variant serving")
    bad = _push(operated, _unique_model(), None)  # a valid model under a valid digest, with no signature
    with ServiceCounter(cluster, ns) as counter:
        time.sleep(1)
        _point_status_at(cluster, operated, bad)
        ed, degraded, pod = wait_for(_refused_in_status(cluster, operated, bad["digest"]), 240, 1,
                                     lambda: f"Degraded {REFUSED}; pods {_pod_states(cluster, operated)}")
        events = wait_for(lambda: _warnings(cluster, operated), 60, 1, f"a Warning event {REFUSED}")
        sent = counter.tally.sent
        wait_for(lambda: counter.tally.sent >= sent + 20, 30, 0.2, "20 more requests after the refusal")
    tally = counter.tally
    print(f"[real-node trust operator] refusal: {tally.sent} requests through the Service, {tally.failed} failed, "
          f"versions {sorted(tally.digests)}", file=sys.__stdout__, flush=True)
    ref_digest = bad["artifact"].split("@")[1]
    # (1) the Warning event on the EdgeDeployment names the signature problem
    assert any("refused (Unsigned)" in e["message"] and "fetch-model exited 6" in e["message"] for e in events), events
    fetch = next(c for c in pod["status"]["initContainerStatuses"] if c["name"] == "fetch-model")
    message = fetch["lastState"]["terminated"].get("message", "")
    assert "refused (Unsigned)" in message and ref_digest in message, message
    # (2) the live status: Degraded VariantSignatureRefused with the fix, the class's message and digest
    assert "fetch-model exited 6" in degraded["message"], degraded
    assert "Fix: sign the variant with a key listed in spec.trust.publicKeysSecret" in degraded["message"], degraded
    (cls,) = [c for c in ed["status"]["classes"] if c["profile"] == profile]
    assert "refused (Unsigned)" in cls["message"], cls
    assert cls["digest"] == bad["digest"], cls  # the DaemonSet asks for it; only the old pod serves
    # (3) the old pod kept serving through the Service: every request answered, all by the signed variant
    assert tally.failures == [], tally.failures[:5]
    assert tally.digests == {_version(signed["digest"])}
    assert get(cluster, ns, "pod", old["metadata"]["name"])["metadata"].get("deletionTimestamp") is None
    assert not any(c.get("ready") for c in pod["status"].get("containerStatuses", [])), "the refused pod is Ready"
    # (4) the refused bytes never entered the node cache
    hexd = bad["digest"].split(":")[1]
    assert not list((operated["cache"] / "sha256").glob(f"{hexd}*")), "the refused variant is in the node cache"

    # back to the signed variant: the refused surge pod goes and Degraded clears
    _point_status_at(cluster, operated, signed)
    wait_for(lambda: serving_pod(cluster, ns, profile, signed["digest"]), 180, 1, "the signed variant alone again")
    wait_for(lambda: (c := condition(get(cluster, ns, "edgedeployment", "digits"), "Degraded")) and
             c["status"] == "False", 90, 1, "Degraded False after the rollback")
    assert not list((operated["cache"] / "sha256").glob(f"{hexd}*"))


def test_real_node_operator_rolls_a_correctly_signed_variant_through_the_service_losing_no_request(
        cluster, operated):
    ns, profile, signed = operated["namespace"], operated["profile"], operated["signed"]
    wait_for(lambda: serving_pod(cluster, ns, profile, signed["digest"]), 180, 1, "the signed variant serving")
    good = _push(operated, _unique_model(), "team")
    with ServiceCounter(cluster, ns) as counter:
        time.sleep(1)
        _point_status_at(cluster, operated, good)
        wait_for(lambda: serving_pod(cluster, ns, profile, good["digest"]), 240, 1,
                 lambda: f"the hand-signed variant served; pods {_pod_states(cluster, operated)}")
        sent = counter.tally.sent
        # past the old pod's --shutdown-delay: requests that kube-proxy still sent it are counted too
        wait_for(lambda: counter.tally.sent >= sent + 20, 30, 0.2, "20 more requests after the rollout")
        time.sleep(6)
    tally = counter.tally
    print(f"[real-node trust operator] signed rollout: {tally.sent} requests through the Service, {tally.failed} "
          f"failed, versions {sorted(tally.digests)}", file=sys.__stdout__, flush=True)
    assert tally.failures == [], tally.failures[:5]
    assert tally.digests == {_version(signed["digest"]), _version(good["digest"])}
    hexd = good["digest"].split(":")[1]
    assert (operated["cache"] / "sha256" / f"{hexd}.sig").is_file(), "the accepted signature is kept in the cache"
    wait_for(lambda: (c := condition(get(cluster, ns, "edgedeployment", "digits"), "Degraded")) and
             c["status"] == "False", 90, 1, "Degraded False after the signed rollout")
