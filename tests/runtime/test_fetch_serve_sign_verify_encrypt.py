"""Signed and encrypted variants on the node: ``fetch --public-key/--require-signature`` refuses before anything
lands in the cache, ``serve`` checks again at load and decrypts in memory."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_cache
from edgefleet_runtime import trust
from edgefleet_runtime.digest import file_digest

EXIT_DIGEST, EXIT_SIGNATURE, EXIT_DECRYPT = 3, 6, 7


def _fetch(*args):
    return subprocess.run(
        [sys.executable, "-m", "edgefleet_runtime.cli", "fetch", *map(str, args)],
        capture_output=True, text=True, timeout=60,
    )


def _serve_exit(model, *args):
    """``serve`` that must refuse at load: its exit code and stderr."""
    r = subprocess.run(
        [sys.executable, "-m", "edgefleet_runtime.cli", "serve", "--model", str(model), "--port", "0",
         "--host", "127.0.0.1", *map(str, args)],
        capture_output=True, text=True, timeout=60,
    )
    return r.returncode, r.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust-keys")
    for name in ("team", "other"):
        private, public = trust.generate_signing_key()
        (d / f"{name}.key").write_bytes(private)
        (d / f"{name}.pub").write_bytes(public)
    (d / "kek").write_bytes(os.urandom(32))
    (d / "wrong-kek").write_bytes(os.urandom(32))
    return d


def _signed_copy(src, dest, key_file):
    dest.write_bytes(src.read_bytes())
    digest = file_digest(dest)
    dest.with_name(dest.name + ".sig").write_text(trust.sign_digest(trust.load_signing_key(key_file), digest))
    return dest, digest


def _nothing_cached(cache, digest):
    blob = cache / "sha256" / digest.split(":")[1]
    tmp = cache / "tmp"
    return not blob.exists() and not (tmp.exists() and list(tmp.iterdir()))


def test_fetch_verify_a_signed_variant_and_keep_its_signature(tmp_path, digits, keys):
    src, digest = _signed_copy(digits[0], tmp_path / "m.onnx", keys / "team.key")
    cache = tmp_path / "cache"
    r = _fetch("--ref", src.as_uri(), "--digest", digest, "--cache", cache, "--name", "digits",
               "--public-key", keys / "other.pub", "--public-key", keys / "team.pub", "--require-signature")
    assert r.returncode == 0, r.stderr
    assert "signature verified" in r.stderr
    blob = cache / "sha256" / digest.split(":")[1]
    assert blob.read_bytes() == digits[0].read_bytes()
    assert blob.with_name(blob.name + ".sig").read_text().strip() == (tmp_path / "m.onnx.sig").read_text()


@pytest.mark.parametrize("case", ["unsigned", "other-key", "garbage"])
def test_fetch_refuses_unsigned_or_wrongly_signed_before_the_cache(tmp_path, digits, keys, case):
    src, digest = _signed_copy(digits[0], tmp_path / "m.onnx", keys / "other.key")
    sig = tmp_path / "m.onnx.sig"
    if case == "unsigned":
        sig.unlink()
    elif case == "garbage":
        sig.write_text(base64.b64encode(os.urandom(70)).decode())
    cache = tmp_path / "cache"
    r = _fetch("--ref", src.as_uri(), "--digest", digest, "--cache", cache, "--name", "digits",
               "--public-key", keys / "team.pub", "--require-signature")
    assert r.returncode == EXIT_SIGNATURE, r.stderr
    reason = "Unsigned" if case == "unsigned" else "BadSignature"
    assert f"refused ({reason})" in r.stderr, r.stderr
    assert _nothing_cached(cache, digest)
    assert not (cache / "current" / "digits").exists()


def test_fetch_without_require_checks_a_present_signature_only(tmp_path, digits, keys):
    src, digest = _signed_copy(digits[0], tmp_path / "m.onnx", keys / "other.key")
    cache = tmp_path / "cache"
    r = _fetch("--ref", src.as_uri(), "--digest", digest, "--cache", cache, "--public-key", keys / "team.pub")
    assert r.returncode == EXIT_SIGNATURE and "BadSignature" in r.stderr
    (tmp_path / "m.onnx.sig").unlink()
    r = _fetch("--ref", src.as_uri(), "--digest", digest, "--cache", cache, "--public-key", keys / "team.pub")
    assert r.returncode == 0, r.stderr


def test_fetch_does_not_reuse_an_unsigned_cached_blob_when_signatures_are_required(tmp_path, digits, keys):
    """An attacker who writes CACHE/sha256/<hex> (right digest, no signature) does not get it past fetch."""
    digest = digits[1]
    cache = tmp_path / "cache"
    make_cache(cache, digits[0], digest)
    offline = (tmp_path / "gone" / "m.onnx").as_uri()  # the source is unreachable
    r = _fetch("--ref", offline, "--digest", digest, "--cache", cache, "--public-key", keys / "team.pub",
               "--require-signature")
    assert r.returncode != 0 and "not trusted" in r.stderr
    assert _nothing_cached(cache, digest)  # the untrusted blob is gone, not served later
    # from a signed source it is fetched again, and then reused offline
    src, _ = _signed_copy(digits[0], tmp_path / "m.onnx", keys / "team.key")
    args = ("--digest", digest, "--cache", cache, "--public-key", keys / "team.pub", "--require-signature")
    assert _fetch("--ref", src.as_uri(), *args).returncode == 0
    r = _fetch("--ref", offline, *args)
    assert r.returncode == 0 and "already cached" in r.stderr, r.stderr


def test_fetch_with_an_unusable_public_key_is_a_usage_error(tmp_path, digits, keys):
    (tmp_path / "bad.pub").write_text("not a key")
    r = _fetch("--ref", digits[0].as_uri(), "--digest", digits[1], "--cache", tmp_path / "c",
               "--public-key", tmp_path / "bad.pub")
    assert r.returncode == 2 and "holds no PEM public key" in r.stderr
    r = _fetch("--ref", digits[0].as_uri(), "--digest", digits[1], "--cache", tmp_path / "c", "--require-signature")
    assert r.returncode == 2 and "needs at least one --public-key" in r.stderr


# ------------------------------------------------------------------------------------------------ serve
def test_serve_verify_a_signed_cached_variant(tmp_path, digits, keys, start_server):
    src, digest = _signed_copy(digits[0], tmp_path / "m.onnx", keys / "team.key")
    cache = tmp_path / "cache"
    assert _fetch("--ref", src.as_uri(), "--digest", digest, "--cache", cache, "--name", "digits").returncode == 0
    s = start_server(cache / "current" / "digits", None, "--public-key", keys / "team.pub", "--require-signature")
    assert "signature verified" in s.logs()


def test_serve_refuses_a_tampered_byte_in_the_cache(tmp_path, digits, keys):
    src, digest = _signed_copy(digits[0], tmp_path / "m.onnx", keys / "team.key")
    cache = tmp_path / "cache"
    assert _fetch("--ref", src.as_uri(), "--digest", digest, "--cache", cache, "--name", "digits").returncode == 0
    blob = cache / "sha256" / digest.split(":")[1]
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    code, err = _serve_exit(cache / "current" / "digits", "--public-key", keys / "team.pub", "--require-signature")
    assert code == EXIT_DIGEST and "digest mismatch" in err, err


def test_serve_refuses_a_blob_planted_under_its_own_digest(tmp_path, digits, digits_v1, keys):
    """Right digest for its bytes, but nobody trusted signed it: refused with the signature's reason."""
    cache = tmp_path / "cache"
    link = make_cache(cache, digits_v1[0], digits_v1[1])
    code, err = _serve_exit(link, "--public-key", keys / "team.pub", "--require-signature")
    assert code == EXIT_SIGNATURE and "refusing to serve (Unsigned)" in err, err
    sig = cache / "sha256" / (digits_v1[1].split(":")[1] + ".sig")
    sig.write_text(trust.sign_digest(trust.load_signing_key(keys / "other.key"), digits_v1[1]))
    code, err = _serve_exit(link, "--public-key", keys / "team.pub", "--require-signature")
    assert code == EXIT_SIGNATURE and "refusing to serve (BadSignature)" in err, err


def test_serve_hot_reload_to_an_unsigned_variant_keeps_the_signed_one(tmp_path, digits, digits_v1, keys, start_server):
    src, digest = _signed_copy(digits[0], tmp_path / "m.onnx", keys / "team.key")
    cache = tmp_path / "cache"
    assert _fetch("--ref", src.as_uri(), "--digest", digest, "--cache", cache, "--name", "digits").returncode == 0
    s = start_server(cache / "current" / "digits", None, "--public-key", keys / "team.pub", "--require-signature",
                     "--watch", "--watch-interval", "0.1")
    make_cache(cache, digits_v1[0], digits_v1[1])  # repoints current/digits at an unsigned blob
    deadline = time.monotonic() + 10
    while "reload refused" not in s.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reload refused" in s.logs() and "Unsigned" in s.logs()
    status, _, body = s.request("GET", "/v2/models/digits")
    assert status == 200 and json.loads(body)["versions"] == [digest.split(":")[1][:12]]


# -------------------------------------------------------------------------------------------- encryption
def _encrypted_cache(tmp_path, digits, keys):
    enc = tmp_path / "m.enc"
    enc.write_bytes(trust.encrypt(digits[0].read_bytes(), trust.load_encryption_key(keys / "kek")))
    _, digest = _signed_copy(enc, enc, keys / "team.key")
    cache = tmp_path / "cache"
    r = _fetch("--ref", enc.as_uri(), "--digest", digest, "--cache", cache, "--name", "digits",
               "--public-key", keys / "team.pub", "--require-signature")
    assert r.returncode == 0, r.stderr
    return cache, digest


def test_encrypt_cache_holds_only_ciphertext_and_serve_answers_the_same(tmp_path, digits, keys, start_server):
    cache, digest = _encrypted_cache(tmp_path, digits, keys)
    plain = digits[0].read_bytes()
    for f in (cache / "sha256").iterdir():
        stored = f.read_bytes()
        for i in range(0, len(plain) - 64, 256):  # no 64-byte window of the model is in the cache
            assert plain[i : i + 64] not in stored, f"plaintext at offset {i} found in {f}"
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    payload = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    enc = start_server(cache / "current" / "digits", None, "--decryption-key-file", keys / "kek",
                       "--public-key", keys / "team.pub", "--require-signature")
    plain_server = start_server(digits[0], digits[1], name="digits")
    got, want = enc.infer_json(payload), plain_server.infer_json(payload)
    assert got[0] == 200 and want[0] == 200, (got, want)
    assert got[1]["outputs"][0]["data"] == want[1]["outputs"][0]["data"]
    loaded = [json.loads(line) for line in enc.logs().splitlines() if '"model loaded"' in line]
    assert loaded and loaded[0]["packaging"] == "encrypted" and loaded[0]["digest"] == digest


def test_encrypt_serve_without_or_with_the_wrong_key_is_refused(tmp_path, digits, keys):
    cache, _ = _encrypted_cache(tmp_path, digits, keys)
    link = cache / "current" / "digits"
    code, err = _serve_exit(link)
    assert code == EXIT_DECRYPT and "is encrypted; pass --decryption-key-file" in err, err
    code, err = _serve_exit(link, "--decryption-key-file", keys / "wrong-kek")
    kek_id = trust.encryption_key_id(trust.load_encryption_key(keys / "kek"))
    assert code == EXIT_DECRYPT and "refusing to serve (BadDecryption)" in err and kek_id in err, err


def test_encrypt_tampered_or_foreign_signed_ciphertext_is_refused_before_decryption(tmp_path, digits, keys):
    cache, digest = _encrypted_cache(tmp_path, digits, keys)
    link = cache / "current" / "digits"
    blob = cache / "sha256" / digest.split(":")[1]
    sig = blob.with_name(blob.name + ".sig")
    sig.write_text(trust.sign_digest(trust.load_signing_key(keys / "other.key"), digest))
    code, err = _serve_exit(link, "--public-key", keys / "team.pub", "--decryption-key-file", keys / "kek")
    assert code == EXIT_SIGNATURE and "BadSignature" in err, err
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0x01
    blob.write_bytes(bytes(data))
    code, err = _serve_exit(link, "--decryption-key-file", keys / "kek")
    assert code == EXIT_DIGEST and "digest mismatch" in err, err


def test_fetch_refusal_is_the_containers_termination_message(tmp_path, digits, keys, monkeypatch):
    """In a pod the kubelet mounts /dev/termination-log: the reason lands in the init container's status,
    where the operator's class message reads it (reconcile/pods.py)."""
    log = tmp_path / "termination-log"
    log.write_text("")
    monkeypatch.setenv("EDGEFLEET_TERMINATION_LOG", str(log))
    r = _fetch("--ref", digits[0].as_uri(), "--digest", digits[1], "--cache", tmp_path / "cache",
               "--public-key", keys / "team.pub", "--require-signature")
    assert r.returncode == EXIT_SIGNATURE
    assert log.read_text().startswith("refused (Unsigned): variant file://") and "no signature" in log.read_text()


def test_management_load_of_an_unsigned_cached_variant_is_refused_403(
    tmp_path, digits, digits_v1, keys, start_server
):
    import http.client

    from conftest import free_port

    src, digest = _signed_copy(digits[0], tmp_path / "m.onnx", keys / "team.key")
    cache = tmp_path / "cache"
    assert _fetch("--ref", src.as_uri(), "--digest", digest, "--cache", cache, "--name", "digits").returncode == 0
    make_cache(cache, digits_v1[0], digits_v1[1], name="other")  # in the cache, but nobody trusted signed it
    mport = free_port()
    s = start_server(cache / "current" / "digits", None, "--cache", str(cache), "--management-port", str(mport),
                     "--public-key", keys / "team.pub", "--require-signature")
    c = http.client.HTTPConnection("127.0.0.1", mport, timeout=10)
    c.request("POST", "/v2/repository/models/digits/load", json.dumps({"parameters": {"digest": digits_v1[1]}}))
    r = c.getresponse()
    body = json.loads(r.read())
    c.close()
    assert r.status == 403 and "refused (Unsigned)" in body["error"], body
    status, _, meta = s.request("GET", "/v2/models/digits")
    assert status == 200 and json.loads(meta)["versions"] == [digest.split(":")[1][:12]]  # still the signed one
