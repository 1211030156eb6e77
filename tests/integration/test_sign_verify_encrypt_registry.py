"""Signed and encrypted variants through the dev cluster's registry, with the pod args the operator renders
for an EdgeDeployment with spec.trust (Secret volumes replaced by directories here, as kubelet lays them out).

- the compiler signs (and encrypts) what it pushes; fetch verifies; serve decrypts in memory and answers
  exactly as the plaintext variant does;
- a variant pushed by hand with a valid digest but no signature, or one by another key, is refused at fetch
  (exit 6, the reason named) and nothing enters the node cache.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from edgefleet.api import EdgeDeployment, Variant, builtin_profiles
from edgefleet.artifacts import OCIStore
from edgefleet.compiler import CompileRequest, CompileTarget, Policy, compile_model
from edgefleet.render import render_class
from edgefleet.render.workload import CACHE_MOUNT, DECRYPTION_KEY_MOUNT, TRUST_KEYS_MOUNT
from edgefleet_dev.net import free_port
from edgefleet_runtime import trust

pytestmark = pytest.mark.cluster
M = Path(__file__).resolve().parent.parent / "fixtures" / "models"
FP32 = CompileTarget(format="onnx", precision="fp32", runtime="onnxruntime")
RUNTIME = [sys.executable, "-m", "edgefleet_runtime.cli"]
EXIT_SIGNATURE = 6


@pytest.fixture
def keys(tmp_path):
    """Signing keys and a key-encryption key, and the Secret volumes the pod would mount."""
    for name in ("team", "intruder", "enc"):
        private, public = trust.generate_signing_key()
        (tmp_path / f"{name}.key").write_bytes(private)
        (tmp_path / f"{name}.pub").write_bytes(public)
    pub_dir = tmp_path / "secret-public-keys"
    pub_dir.mkdir()
    (pub_dir / "team.pub").write_bytes((tmp_path / "team.pub").read_bytes())
    dec_dir = tmp_path / "secret-decryption"
    dec_dir.mkdir()
    (dec_dir / "key").write_bytes((tmp_path / "enc.key").read_bytes())  # the private half, as its Secret
    return tmp_path


def _pod_args(ref: str, digest: str, encrypted: bool) -> tuple[list[str], list[str]]:
    profiles = builtin_profiles()
    profile = next(p for p in profiles if p.metadata["name"] == "cpu-amd64")
    trust_spec = {"publicKeysSecret": "team-keys", "requireSignature": True}
    if encrypted:
        trust_spec["decryptionKeySecret"] = {"name": "digits-kek", "key": "kek"}
    ed = EdgeDeployment(metadata={"name": "digits", "namespace": "default", "uid": str(uuid.uuid4())},
                        spec={"modelRef": {"name": "digits"}, "trust": trust_spec})
    variant = Variant(profile="cpu-amd64", artifact=ref, digest=digest, state="Ready")
    pod = render_class(ed, profile, variant, profiles, CACHE_MOUNT)["spec"]["template"]["spec"]
    return pod["initContainers"][1]["args"], pod["containers"][0]["args"]


def _local(args: list[str], keys: Path, cache: Path) -> list[str]:
    """The rendered args with the node cache and the Secret volumes at local directories."""
    return [a.replace(CACHE_MOUNT, str(cache)).replace(TRUST_KEYS_MOUNT, str(keys / "secret-public-keys"))
            .replace(DECRYPTION_KEY_MOUNT, str(keys / "secret-decryption")) for a in args]


def _run(args):
    return subprocess.run([*RUNTIME, *args], capture_output=True, text=True, timeout=120)


def _compile(store, tmp_path, **trust_args):
    request = CompileRequest(str(M / "digits_cnn.onnx"), {"cpu-amd64": FP32},
                             Policy(quantization="none", timingRuns=2, threads=1), name="digits")
    v = compile_model(request, store, tmp_path / "compile", **trust_args).variants["cpu-amd64"]
    assert v.state == "Ready", (v.reason, v.message)
    return v


def _serve_and_infer(args: list[str], log: Path, x: np.ndarray) -> list[float]:
    port = free_port()
    args = [a for a in args if not a.startswith("--port=")]
    proc = subprocess.Popen([*RUNTIME, *args, f"--port={port}", "--host=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(base + "/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        req = urllib.request.Request(base + "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["outputs"][0]["data"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()


def test_signed_encrypted_variant_from_the_registry_serves_the_same_answers(cluster, tmp_path, keys):
    store = OCIStore(cluster.registry, f"edgefleet-test/{uuid.uuid4().hex[:8]}", insecure=True)
    plain = _compile(store, tmp_path)
    enc = _compile(store, tmp_path, signing_key_file=keys / "team.key",
                   encryption_key=trust.load_encryption_key(keys / "enc.pub"))
    assert enc.digest != plain.digest
    assert trust.SIGNATURE_ANNOTATION in store.annotations(enc.artifact)

    fetch_args, serve_args = _pod_args(enc.artifact, enc.digest, encrypted=True)
    assert f"--public-key={TRUST_KEYS_MOUNT}" in fetch_args and "--require-signature" in fetch_args
    assert f"--decryption-key-file={DECRYPTION_KEY_MOUNT}/key" in serve_args
    cache = tmp_path / "node-cache"
    r = _run(_local(fetch_args, keys, cache))
    assert r.returncode == 0, r.stderr
    blob = cache / "sha256" / enc.digest.split(":")[1]
    stored = blob.read_bytes()
    plaintext = trust.decrypt(stored, trust.load_decryption_key(keys / "enc.key"))
    assert trust.is_encrypted(stored) and plaintext[:128] not in stored and plaintext[-128:] not in stored
    assert blob.with_name(blob.name + ".sig").exists()

    x = np.load(M / "digits_eval.npz")["input"][:8].astype(np.float32)
    got = _serve_and_infer(_local(serve_args, keys, cache), tmp_path / "enc.log", x)

    plain_cache = tmp_path / "plain-cache"
    p_fetch, p_serve = _pod_args(plain.artifact, plain.digest, encrypted=False)
    p_fetch = [a for a in p_fetch if a != "--require-signature"]  # the plaintext one is unsigned
    assert _run(_local(p_fetch, keys, plain_cache)).returncode == 0
    p_serve = [a for a in p_serve if a != "--require-signature"]
    want = _serve_and_infer(_local(p_serve, keys, plain_cache), tmp_path / "plain.log", x)
    assert got == want


@pytest.mark.parametrize("case", ["unsigned", "intruder"])
def test_hand_pushed_variant_without_a_trusted_signature_is_refused_at_fetch(cluster, tmp_path, keys, case):
    """Valid digest in the registry, but no signature (or one by a key the policy does not name)."""
    store = OCIStore(cluster.registry, f"edgefleet-test/{uuid.uuid4().hex[:8]}", insecure=True)
    data = (M / "digits_cnn.onnx").read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    annotations = {}
    if case == "intruder":
        annotations[trust.SIGNATURE_ANNOTATION] = trust.sign_digest(trust.load_signing_key(keys / "intruder.key"),
                                                                    digest)
    ref = store.put(data, name="digits-by-hand", media_type="application/vnd.onnx.model", annotations=annotations)
    assert ref.digest == digest
    fetch_args, _ = _pod_args(ref.ref, digest, encrypted=False)
    cache = tmp_path / "node-cache"
    r = _run(_local(fetch_args, keys, cache))
    assert r.returncode == EXIT_SIGNATURE, r.stderr
    reason = "Unsigned" if case == "unsigned" else "BadSignature"
    assert f"refused ({reason})" in r.stderr, r.stderr
    if case == "unsigned":
        assert trust.SIGNATURE_ANNOTATION in r.stderr  # says where the signature was looked for
    assert not (cache / "sha256" / digest.split(":")[1]).exists()
    assert not (cache / "current" / "digits").exists()
    # edgefleet sign --push of the same bytes with the trusted key: accepted
    from click.testing import CliRunner
    from edgefleet.cli import main

    (tmp_path / "model.onnx").write_bytes(data)
    res = CliRunner().invoke(main, ["sign", str(tmp_path / "model.onnx"), "--key", str(keys / "team.key"),
                                    "--push", f"oci://{store.registry}/{store.repository}"])
    assert res.exit_code == 0, res.output
    signed_ref = res.output.split("pushed ", 1)[1].split()[0]
    res = CliRunner().invoke(main, ["verify", signed_ref, "--public-key", str(keys / "team.pub")])
    assert res.exit_code == 0, res.output
    fetch_args, _ = _pod_args(signed_ref, digest, encrypted=False)
    r = _run(_local(fetch_args, keys, cache))
    assert r.returncode == 0, r.stderr
