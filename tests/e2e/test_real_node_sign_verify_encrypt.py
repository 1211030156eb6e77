"""Signed and encrypted variants on the dev cluster's real node (docs/trust.md).

The class the real node belongs to runs the DaemonSet the operator renders for an EdgeDeployment with
spec.trust (edgefleet.render.render_class: the same fetch/serve args, Secret volumes and surge), applied
here without an operator: variants pushed by hand to the registry can then be pointed at directly, as
whoever can edit an EdgeModel's status could. The class's condition text comes from the operator's own
function over the real pods (reconcile.pods.class_health); test_real_node_operator_sign_verify.py runs the
operator itself and reads its event and condition. Every refusal happens while a client counts
each request to the old pod, which must keep answering with the old variant.

Traffic goes only to the pods this module creates; loops are bounded in count and time."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kube_helpers import get, is_ready, items, wait_for
from real_node_helpers import TOLERATION, eval_set, real_node_class

pytestmark = pytest.mark.cluster

MODEL = "trust-digits"
ONNX = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "digits_cnn.onnx"
TOKEN_MOUNT = "/etc/edgefleet/management"


def _unique_model() -> bytes:
    """The quickstart model with a doc string of its own: a digest no other test's cache entry shares."""
    import onnx

    model = onnx.load(str(ONNX))
    model.doc_string = f"trust e2e {uuid.uuid4()}"
    return model.SerializeToString()


@pytest.fixture(scope="module")
def trusted(cluster, real_node, tmp_path_factory):
    from edgefleet.api import HardwareProfile
    from edgefleet.api.models import Toleration
    from edgefleet.artifacts import open_store
    from edgefleet_runtime import trust

    keys = tmp_path_factory.mktemp("trust-e2e-keys")
    for name in ("team", "other", "enc", "wrong-enc"):
        private, public = trust.generate_signing_key()
        (keys / f"{name}.key").write_bytes(private)
        (keys / f"{name}.pub").write_bytes(public)
    namespace = f"rn-trust-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("create", "secret", "generic", "team-keys", "-n", namespace,
                    f"--from-file=team.pub={keys / 'team.pub'}")
    cluster.kubectl("create", "secret", "generic", "digits-kek", "-n", namespace,
                    f"--from-file=key={keys / 'enc.key'}")
    token = uuid.uuid4().hex
    cluster.kubectl("create", "secret", "generic", "mgmt-token", "-n", namespace, f"--from-literal=token={token}")
    name = real_node_class(cluster)
    profiles = [HardwareProfile.model_validate(p) for p in items(cluster, None, "hardwareprofiles")]
    profile = next(p for p in profiles if p.metadata["name"] == name)
    # tolerate the real node's taint in this rendering only: the cluster's profile stays as it is
    profile = profile.model_copy(deep=True)
    profile.spec.tolerations = [*profile.spec.tolerations, Toleration.model_validate(TOLERATION)]
    ctx = {"namespace": namespace, "keys": keys, "profile": profile, "profiles": profiles, "token": token,
           "store": open_store(f"oci://{cluster.registry}/edgefleet-trust-e2e/{namespace}", True),
           "plain": _unique_model(), "cache": Path(cluster.real_node["nodeCache"])}
    yield ctx
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _push(ctx, data: bytes, key: str | None) -> dict:
    """Push bytes by hand, signed with keys/<key>.key (None: unsigned); returns the variant as status holds it."""
    from edgefleet_runtime import trust

    annotations = {}
    if key:
        signing_key = trust.load_signing_key(ctx["keys"] / f"{key}.key")
        annotations[trust.SIGNATURE_ANNOTATION] = trust.sign_digest(signing_key, "sha256:" +
                                                                   hashlib.sha256(data).hexdigest())
    ref = ctx["store"].put(data, name=MODEL, media_type="application/octet-stream", annotations=annotations,
                           filename="model.onnx")
    return {"artifact": ref.ref, "digest": ref.digest}


def _encrypted(ctx, public: str) -> bytes:
    from edgefleet_runtime import trust

    return trust.encrypt(ctx["plain"], trust.load_encryption_key(ctx["keys"] / f"{public}.pub"))


def _apply(cluster, ctx, variant: dict, decrypt: bool = False) -> dict:
    """Render the class's DaemonSet for `variant` as the operator would, and apply it (no owner: no operator)."""
    from edgefleet.api import EdgeDeployment, Variant
    from edgefleet.render import render_class
    from edgefleet.render.workload import CACHE_MOUNT, render_service

    trust_spec = {"publicKeysSecret": "team-keys", "requireSignature": True}
    if decrypt:
        trust_spec["decryptionKeySecret"] = {"name": "digits-kek", "key": "key"}
    ed = EdgeDeployment(metadata={"name": MODEL, "namespace": ctx["namespace"], "uid": str(uuid.uuid4())},
                        spec={"modelRef": {"name": MODEL}, "trust": trust_spec, "runtime": {"threads": 1},
                              # the class also has kwok nodes: only the real node runs processes
                              "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": cluster.real_node["name"]}}})
    artifact = variant["artifact"].replace(cluster.registry, cluster.pod_registry)
    v = Variant(profile=ctx["profile"].metadata["name"], artifact=artifact, digest=variant["digest"], state="Ready")
    ds = render_class(ed, ctx["profile"], v, ctx["profiles"], str(ctx["cache"]), insecure=True)
    ds["metadata"].pop("ownerReferences", None)
    pod = ds["spec"]["template"]["spec"]
    # the management API (off in what the operator renders) lets this test ask the running server to reload
    pod["volumes"].append({"name": "mgmt-token", "secret": {"secretName": "mgmt-token", "defaultMode": 0o440}})
    (runtime,) = pod["containers"]
    runtime["args"] += [f"--management-token-file={TOKEN_MOUNT}/token", f"--cache={CACHE_MOUNT}"]
    runtime["volumeMounts"].append({"name": "mgmt-token", "mountPath": TOKEN_MOUNT, "readOnly": True})
    service = render_service(ed)
    service["metadata"].pop("ownerReferences", None)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [ds, service]}))
    return ds


def _pods(cluster, ctx, digest: str | None = None) -> list[dict]:
    pods = [p for p in items(cluster, ctx["namespace"], "pods") if not p["metadata"].get("deletionTimestamp")
            and p["spec"].get("nodeName") == cluster.real_node["name"]]
    return [p for p in pods if digest is None or p["metadata"]["annotations"].get("edgefleet.io/variant-digest")
            == digest]


def _serving(cluster, ctx, digest: str):
    def check():
        pods = _pods(cluster, ctx)
        ready = [p for p in pods if is_ready(p)]
        if len(pods) == 1 and ready and ready[0]["metadata"]["annotations"]["edgefleet.io/variant-digest"] == digest:
            return ready[0]
        return None
    return check


def infer(host: str, image: np.ndarray) -> tuple[int, dict | str]:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, *image.shape], "datatype": "FP32",
                                   "data": image.ravel().tolist()}]})
    conn = http.client.HTTPConnection(host, 8080, timeout=5)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if resp.status == 200 else data.decode(errors="replace"))
    finally:
        conn.close()


def logits(host: str, x: np.ndarray) -> np.ndarray:
    out = []
    for image in x:
        status, body = infer(host, image)
        assert status == 200, body
        out.append(body["outputs"][0]["data"])
    return np.asarray(out)


class Counter(threading.Thread):
    """Requests to one pod until stopped (bounded): every answer's model version, every failure."""

    def __init__(self, host: str, limit: int = 20000):
        super().__init__(daemon=True)
        self.host, self.limit, self.stop = host, limit, threading.Event()
        self.sent, self.versions, self.failures = 0, set(), []
        self.image = eval_set(1)[0][0]

    def run(self) -> None:
        while not self.stop.is_set() and self.sent < self.limit:
            self.sent += 1
            try:
                status, body = infer(self.host, self.image)
            except (OSError, http.client.HTTPException) as err:
                self.failures.append(repr(err))
            else:
                if status == 200:
                    self.versions.add(body.get("model_version"))
                else:
                    self.failures.append(f"{status}: {body[:200]}")
            time.sleep(0.02)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(30)


def _refused(cluster, ctx, digest: str, container: str, exit_code: int, timeout: float = 180) -> dict:
    """The surge pod of `digest`, once `container` exited `exit_code` and the class counts it as stuck."""
    from edgefleet.reconcile.pods import class_health

    def check():
        for pod in _pods(cluster, ctx, digest):
            statuses = (pod["status"].get("initContainerStatuses") or []) + (pod["status"].get(
                "containerStatuses") or [])
            cs = next((c for c in statuses if c["name"] == container), None)
            last = (cs or {}).get("lastState", {}).get("terminated") or {}
            health = class_health(_pods(cluster, ctx), time.time())
            if last.get("exitCode") == exit_code and health.stuck is not None:
                return {"pod": pod, "terminated": last, "health": health}
        return None
    return wait_for(check, timeout, 1, f"{container} of the pod for {digest[:19]} to exit {exit_code}")


def _no_bytes_in_cache(ctx, digest: str) -> None:
    blob = ctx["cache"] / "sha256" / digest.split(":")[1]
    assert not blob.exists(), f"{blob} entered the node cache"


@pytest.fixture(scope="module")
def serving_signed(cluster, trusted):
    """The correctly signed variant served on the real node: the baseline every refusal must leave serving."""
    variant = _push(trusted, trusted["plain"], "team")
    _apply(cluster, trusted, variant)
    pod = wait_for(_serving(cluster, trusted, variant["digest"]), 240, 1, "the signed variant served on the real node")
    trusted["signed"] = variant
    return pod


def test_real_node_signed_variant_is_verified_at_fetch_and_serves(cluster, trusted, serving_signed):
    pod = serving_signed
    assert pod["spec"]["nodeName"] == cluster.real_node["name"]
    fetch = next(c for c in pod["spec"]["initContainers"] if c["name"] == "fetch-model")
    assert "--require-signature" in fetch["args"]
    digest = trusted["signed"]["digest"]
    hexd = digest.split(":")[1]
    assert (trusted["cache"] / "sha256" / hexd).read_bytes() == trusted["plain"]
    assert (trusted["cache"] / "sha256" / f"{hexd}.sig").is_file(), "the accepted signature is kept in the cache"
    x, y = eval_set(64)
    out = logits(pod["status"]["podIP"], x)
    trusted["answers"] = out
    assert (out.argmax(axis=1) == y).mean() > 0.9


@pytest.mark.parametrize("signer, reason", [(None, "Unsigned"), ("other", "BadSignature")])
def test_real_node_verify_refuses_a_hand_pushed_variant_at_fetch_and_the_old_pod_keeps_serving(
        cluster, trusted, serving_signed, signer, reason):
    old = wait_for(_serving(cluster, trusted, trusted["signed"]["digest"]), 120, 1, "the signed variant serving")
    data = _unique_model()  # a valid model with a valid digest; only its signature is missing or foreign
    bad = _push(trusted, data, signer)
    with Counter(old["status"]["podIP"]) as counter:
        time.sleep(1)
        _apply(cluster, trusted, bad)
        refused = _refused(cluster, trusted, bad["digest"], "fetch-model", 6)
        sent_at_refusal = counter.sent
        wait_for(lambda: counter.sent >= sent_at_refusal + 20, 30, 0.2, "20 more requests after the refusal")
    message = refused["terminated"].get("message", "")
    assert f"refused ({reason})" in message and bad["artifact"].split("@")[1] in message, message
    health = refused["health"]
    assert health.stuck.reason == "VariantSignatureRefused", health.stuck
    assert reason in health.message and "fetch-model exited 6" in health.message, health.message
    assert "spec.trust.publicKeysSecret" in health.stuck.fix
    _no_bytes_in_cache(trusted, bad["digest"])
    assert not is_ready(refused["pod"])
    still = get(cluster, trusted["namespace"], "pod", old["metadata"]["name"])
    assert is_ready(still), "the old pod stopped serving"
    print(f"[real-node trust] {reason}: {counter.sent} requests to the old pod during the refusal, "
          f"{len(counter.failures)} failed")
    assert counter.failures == [], counter.failures[:5]
    assert counter.versions == {trusted["signed"]["digest"].split(":")[1][:12]}
    _apply(cluster, trusted, trusted["signed"])  # roll back: the refused surge pod goes
    wait_for(_serving(cluster, trusted, trusted["signed"]["digest"]), 120, 1, "back to the signed variant alone")


def _load(host: str, token: str, digest: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, 8080, timeout=10)
    try:
        conn.request("POST", f"/v2/repository/models/{MODEL}/load", json.dumps({"parameters": {"digest": digest}}),
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def test_real_node_verify_refuses_a_tampered_or_planted_cache_file_at_load(cluster, trusted, serving_signed):
    pod = wait_for(_serving(cluster, trusted, trusted["signed"]["digest"]), 120, 1, "the signed variant serving")
    host, digest = pod["status"]["podIP"], trusted["signed"]["digest"]
    blob = trusted["cache"] / "sha256" / digest.split(":")[1]
    planted_bytes = _unique_model()
    planted = "sha256:" + hashlib.sha256(planted_bytes).hexdigest()
    planted_blob = trusted["cache"] / "sha256" / planted.split(":")[1]
    with Counter(host) as counter:
        original = blob.read_bytes()
        blob.chmod(0o644)
        blob.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])  # one byte flipped
        status, text = _load(host, trusted["token"], digest)
        assert status == 409 and "does not match that digest" in text, (status, text)
        # bytes planted under their own digest (it matches) but with no trusted signature beside them
        planted_blob.write_bytes(planted_bytes)
        status, text = _load(host, trusted["token"], planted)
        assert status == 403 and "Unsigned" in text, (status, text)
        (planted_blob.parent / f"{planted_blob.name}.sig").write_text(base64.b64encode(b"\x30\x06garbage").decode())
        status, text = _load(host, trusted["token"], planted)
        assert status == 403 and "BadSignature" in text, (status, text)
        time.sleep(1)
    print(f"[real-node trust] cache refusals at load: {counter.sent} requests, {len(counter.failures)} failed")
    assert counter.failures == [], counter.failures[:5]
    assert counter.versions == {digest.split(":")[1][:12]}, "a refused load changed what is served"
    assert np.allclose(logits(host, eval_set(64)[0]), trusted["answers"])
    blob.write_bytes(original)  # the cache entry is this module's own (unique digest)
    for path in (planted_blob, planted_blob.parent / f"{planted_blob.name}.sig"):
        path.unlink()


def test_real_node_encrypt_cache_holds_ciphertext_serves_the_same_answers_and_a_wrong_key_is_refused(
        cluster, trusted, serving_signed):
    from edgefleet_runtime.trust import MAGIC

    old_variant = trusted["signed"]
    wait_for(_serving(cluster, trusted, old_variant["digest"]), 120, 1, "the signed variant serving")
    encrypted = _push(trusted, _encrypted(trusted, "enc"), "team")
    # through the Service: the old pod goes once the new one is Ready (surge), and keeps serving --shutdown-delay
    # seconds after SIGTERM while kube-proxy drops its endpoint, so no request is lost
    service_ip = get(cluster, trusted["namespace"], "service", MODEL)["spec"]["clusterIP"]
    with Counter(service_ip) as counter:
        _apply(cluster, trusted, encrypted, decrypt=True)
        pod = wait_for(_serving(cluster, trusted, encrypted["digest"]), 240, 1, "the encrypted variant served")
        sent = counter.sent
        wait_for(lambda: counter.sent >= sent + 20, 30, 0.2, "20 more requests after the rollout")
        time.sleep(6)  # past the old pod's shutdown delay: requests kube-proxy still sent it are counted too
    print(f"[real-node trust] rollout to the encrypted variant: {counter.sent} requests through the Service, "
          f"{len(counter.failures)} failed, versions {sorted(counter.versions)}")
    assert counter.failures == [], counter.failures[:5]
    assert counter.versions == {v["digest"].split(":")[1][:12] for v in (old_variant, encrypted)}
    cached = (trusted["cache"] / "sha256" / encrypted["digest"].split(":")[1]).read_bytes()
    assert cached.startswith(MAGIC)
    plain = trusted["plain"]
    windows = [plain[i:i + 32] for i in range(0, len(plain) - 32, 997)]
    assert not [w for w in windows if w in cached], "plaintext model bytes are in the node cache"
    assert plain not in cached
    assert np.allclose(logits(pod["status"]["podIP"], eval_set(64)[0]), trusted["answers"])

    # signed correctly, but encrypted for a key this deployment does not hold: the runtime refuses it
    foreign = _push(trusted, _encrypted(trusted, "wrong-enc"), "team")
    with Counter(pod["status"]["podIP"]) as counter:
        _apply(cluster, trusted, foreign, decrypt=True)
        refused = _refused(cluster, trusted, foreign["digest"], "runtime", 7)
        sent = counter.sent
        wait_for(lambda: counter.sent >= sent + 20, 30, 0.2, "20 more requests after the refusal")
    message = refused["terminated"].get("message", "")
    from edgefleet_runtime.trust import encryption_key_id, load_encryption_key

    wanted, held = (encryption_key_id(load_encryption_key(trusted["keys"] / f"{k}.pub")) for k in ("wrong-enc", "enc"))
    assert "refusing to serve (BadDecryption)" in message, message
    assert f"encrypted for key {wanted}; the decryption key given is {held}" in message, message
    assert "runtime exited 7" in refused["health"].message, refused["health"].message
    assert counter.failures == [], counter.failures[:5]
    assert counter.versions == {encrypted["digest"].split(":")[1][:12]}
    print(f"[real-node trust] wrong key: {message[:300]}")
    _apply(cluster, trusted, encrypted, decrypt=True)
    wait_for(_serving(cluster, trusted, encrypted["digest"]), 120, 1, "back to the encrypted variant alone")
