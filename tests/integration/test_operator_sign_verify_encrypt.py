"""The operator end to end: an EdgeModel with spec.encryption and an EdgeDeployment with spec.trust. The
operator (signing key from EDGEFLEET_SIGNING_KEY_FILE) publishes signed ciphertext to the cluster's registry,
renders the trust flags and Secret volumes into the class's DaemonSet, and the init container's and runtime's
args taken from that DaemonSet fetch, verify, decrypt and serve here (the fleet's kwok nodes run no
processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from edgefleet.artifacts import open_store
from edgefleet.artifacts.store import parse_oci
from edgefleet.render.workload import CACHE_MOUNT, DECRYPTION_KEY_MOUNT, TRUST_KEYS_MOUNT
from edgefleet_dev.net import free_port
from edgefleet_runtime import trust
from edgefleet_runtime.backends import open_backend
from kube_helpers import get, items, wait_for
from operator_helpers import converged, quickstart_into, why_not

pytestmark = pytest.mark.cluster
RUNTIME = [sys.executable, "-m", "edgefleet_runtime.cli"]
EVAL = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "digits_eval.npz"


@pytest.fixture(scope="module", autouse=True)
def keys(tmp_path_factory):
    """Signing and encryption key pairs; the operator (started after this) signs with sign.key."""
    d = tmp_path_factory.mktemp("trust-keys")
    for name in ("sign", "enc"):
        private, public = trust.generate_signing_key()
        (d / f"{name}.key").write_bytes(private)
        (d / f"{name}.pub").write_bytes(public)
    saved = os.environ.get("EDGEFLEET_SIGNING_KEY_FILE")
    os.environ["EDGEFLEET_SIGNING_KEY_FILE"] = str(d / "sign.key")
    yield d
    os.environ.pop("EDGEFLEET_SIGNING_KEY_FILE") if saved is None else os.environ.__setitem__(
        "EDGEFLEET_SIGNING_KEY_FILE", saved)


def _secret_dirs(keys: Path) -> tuple[Path, Path]:
    """The two Secrets laid out as the kubelet mounts them."""
    pub, dec = keys / "mount-public-keys", keys / "mount-decryption"
    pub.mkdir(exist_ok=True)
    dec.mkdir(exist_ok=True)
    (pub / "sign.pub").write_bytes((keys / "sign.pub").read_bytes())
    (dec / "key").write_bytes((keys / "enc.key").read_bytes())
    return pub, dec


def test_operator_publishes_signed_ciphertext_and_the_rendered_pod_serves_it(operator, cluster, namespace, keys):
    cluster.kubectl("create", "secret", "generic", "team-keys", "-n", namespace,
                    f"--from-file=sign.pub={keys / 'sign.pub'}")
    cluster.kubectl("create", "secret", "generic", "digits-kek", "-n", namespace,
                    f"--from-file=key={keys / 'enc.key'}")
    docs = quickstart_into(cluster, namespace)
    em = next(d for d in docs if d["kind"] == "EdgeModel")
    patch = {"spec": {"targetProfiles": {"names": ["cpu-amd64"]},
                      "optimization": {"quantization": "none", "calibration": None},
                      "encryption": {"publicKey": (keys / "enc.pub").read_text()}}}
    cluster.kubectl("patch", "edgemodel", em["metadata"]["name"], "-n", namespace, "--type=merge",
                    "-p", json.dumps(patch))
    trust_spec = {"spec": {"trust": {"publicKeysSecret": "team-keys", "requireSignature": True,
                                     "decryptionKeySecret": {"name": "digits-kek", "key": "key"}}}}
    cluster.kubectl("patch", "edgedeployment", "digits", "-n", namespace, "--type=merge",
                    "-p", json.dumps(trust_spec))
    served, variants, _ = wait_for(lambda: converged(cluster, namespace), timeout=240,
                                   what=why_not(namespace, "encrypted, signed quickstart converged"))
    variant = variants["cpu-amd64"]

    # the registry holds signed ciphertext
    registry, repository, _ = parse_oci(variant["artifact"])
    store = open_store(f"oci://{registry}/{repository}")
    stored = store.get(variant["artifact"], variant["digest"])
    assert trust.is_encrypted(stored)
    signature = store.annotations(variant["artifact"])[trust.SIGNATURE_ANNOTATION]
    trusted = trust.load_public_keys([keys / "sign.pub"])
    assert trust.verify_digest(trusted, variant["digest"], signature, "variant")

    # the DaemonSet the operator applied carries the flags and volumes
    (ds,) = [d for d in items(cluster, namespace, "daemonsets") if d["metadata"]["name"] == "digits-cpu-amd64"]
    pod = ds["spec"]["template"]["spec"]
    fetch, serve = pod["initContainers"][1], pod["containers"][0]
    assert "--require-signature" in fetch["args"] and f"--public-key={TRUST_KEYS_MOUNT}" in fetch["args"]
    assert f"--decryption-key-file={DECRYPTION_KEY_MOUNT}/key" in serve["args"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["trust-public-keys"]["secret"]["secretName"] == "team-keys"
    assert volumes["decryption-key"]["secret"]["secretName"] == "digits-kek"
    assert {p["metadata"]["annotations"]["edgefleet.io/variant-digest"] for p in served.values()} == {
        variant["digest"]}

    # ... and those args, run here, fetch (verified), then serve (decrypted in memory)
    pub_dir, dec_dir = _secret_dirs(keys)
    cache = keys / "node-cache"

    def local(args):
        return [a.replace(CACHE_MOUNT, str(cache)).replace(TRUST_KEYS_MOUNT, str(pub_dir))
                .replace(DECRYPTION_KEY_MOUNT, str(dec_dir)) for a in args if not a.startswith("--port=")]

    r = subprocess.run([*RUNTIME, *local(fetch["args"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert trust.is_encrypted((cache / "sha256" / variant["digest"].split(":")[1]).read_bytes())
    port = free_port()
    log = keys / "serve.log"
    proc = subprocess.Popen([*RUNTIME, *local(serve["args"]), f"--port={port}", "--host=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        x = np.load(EVAL)["input"][:64].astype(np.float32)
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = json.loads(resp.read())
        logits = np.asarray(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
        # the same answers as the plaintext variant (decrypted here with the private key) run directly
        plain = open_backend("plain", threads=1, data=trust.decrypt(stored, trust.load_decryption_key(
            keys / "enc.key")))
        want = plain.run({"input": x}, [out["outputs"][0]["name"]])[out["outputs"][0]["name"]]
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
    assert get(cluster, namespace, "edgemodel", "digits")["spec"]["encryption"]["publicKey"].startswith("-----BEGIN")
