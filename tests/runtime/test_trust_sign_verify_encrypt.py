"""edgefleet_runtime.trust: cosign-compatible signatures (checked against openssl) and AES-256-GCM envelopes."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess

import pytest
from edgefleet_runtime import trust
from edgefleet_runtime.trust import TrustError

MODEL = b"\x08\x07model bytes " * 1000


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def keypair(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    private, public = trust.generate_signing_key()
    (d / "k.key").write_bytes(private)
    (d / "k.pub").write_bytes(public)
    return d / "k.key", d / "k.pub"


def test_sign_then_verify_names_the_key(keypair):
    key = trust.load_signing_key(keypair[0])
    (pub,) = trust.load_public_keys([keypair[1]])
    sig = trust.sign_digest(key, _digest(MODEL))
    assert trust.verify_digest([pub], _digest(MODEL), sig, "m") == trust.key_id(pub)


def test_verify_refuses_other_bytes_other_key_and_no_signature(keypair):
    key = trust.load_signing_key(keypair[0])
    (pub,) = trust.load_public_keys([keypair[1]])
    sig = trust.sign_digest(key, _digest(MODEL))
    with pytest.raises(TrustError) as e:
        trust.verify_digest([pub], _digest(MODEL + b"x"), sig, "variant cpu")
    assert e.value.reason == "BadSignature" and "variant cpu" in str(e.value) and trust.key_id(pub) in str(e.value)
    _, other_pub = trust.generate_signing_key()
    from cryptography.hazmat.primitives import serialization

    other = serialization.load_pem_public_key(other_pub)
    with pytest.raises(TrustError, match="does not verify") as e:
        trust.verify_digest([other], _digest(MODEL), sig, "m")
    assert e.value.reason == "BadSignature"
    for missing in (None, "", "  \n"):
        with pytest.raises(TrustError, match="no signature") as e:
            trust.verify_digest([pub], _digest(MODEL), missing, "m")
        assert e.value.reason == "Unsigned"
    with pytest.raises(TrustError, match="not base64"):
        trust.verify_digest([pub], _digest(MODEL), "!!not base64!!", "m")
    with pytest.raises(TrustError, match="longer than 1024 bytes"):  # e.g. a huge manifest annotation
        trust.verify_digest([pub], _digest(MODEL), "A" * (10 << 20), "m")


def test_any_of_several_keys_verifies(tmp_path, keypair):
    _, other_pub = trust.generate_signing_key()
    both = tmp_path / "both.pub"
    both.write_bytes(other_pub + keypair[1].read_bytes())
    keys = trust.load_public_keys([both])
    assert len(keys) == 2
    sig = trust.sign_digest(trust.load_signing_key(keypair[0]), _digest(MODEL))
    assert trust.verify_digest(keys, _digest(MODEL), sig, "m") == trust.key_id(keys[1])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_signatures_are_the_ones_openssl_and_cosign_sign_blob_make(tmp_path, keypair):
    """cosign sign-blob = base64(DER ECDSA over SHA-256 of the file): openssl checks ours, we check openssl's."""
    blob = tmp_path / "model.onnx"
    blob.write_bytes(MODEL)
    sig = trust.sign_digest(trust.load_signing_key(keypair[0]), _digest(MODEL))
    (tmp_path / "ours.der").write_bytes(base64.b64decode(sig))
    r = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(keypair[1]), "-signature", str(tmp_path / "ours.der"), str(blob)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0 and "Verified OK" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(keypair[0]), str(blob)], capture_output=True)
    assert r.returncode == 0, r.stderr
    (pub,) = trust.load_public_keys([keypair[1]])
    assert trust.verify_digest([pub], _digest(MODEL), base64.b64encode(r.stdout), "m") == trust.key_id(pub)


def test_keys_that_are_not_p256_pem_are_refused_with_the_fix(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    p384 = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "p384.key").write_bytes(
        p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(TrustError, match="not an ECDSA P-256 key.*keygen signing"):
        trust.load_signing_key(tmp_path / "p384.key")
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    (tmp_path / "ed.pub").write_bytes(trust.public_pem(ed))
    with pytest.raises(TrustError, match="not an ECDSA P-256 key"):
        trust.load_public_keys([tmp_path / "ed.pub"])
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(TrustError, match="holds no PEM public key"):
        trust.load_public_keys([tmp_path / "junk.pub"])
    with pytest.raises(TrustError, match="cannot read the signing key"):
        trust.load_signing_key(tmp_path / "missing.key")
    (tmp_path / "cosign.key").write_text("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nabc\n")
    with pytest.raises(TrustError, match="cosign sign-blob"):
        trust.load_signing_key(tmp_path / "cosign.key")


def test_policy_checks_present_signatures_and_requires_them_only_when_told(keypair):
    key = trust.load_signing_key(keypair[0])
    sig = trust.sign_digest(key, _digest(MODEL))
    lax = trust.Policy.from_files([keypair[1]])
    assert lax.check(_digest(MODEL), None, "m") is None
    assert lax.check(_digest(MODEL), sig, "m") is not None
    with pytest.raises(TrustError):
        lax.check(_digest(MODEL + b"!"), sig, "m")  # a wrong signature is refused even when not required
    strict = trust.Policy.from_files([keypair[1]], require_signature=True)
    with pytest.raises(TrustError) as e:
        strict.check(_digest(MODEL), None, "m")
    assert e.value.reason == "Unsigned"
    with pytest.raises(TrustError, match="needs at least one --public-key"):
        trust.Policy.from_files([], require_signature=True)
    assert trust.Policy().check(_digest(MODEL), None, "m") is None


# ------------------------------------------------------------------------------------------ encryption
def test_encrypt_round_trip_and_the_ciphertext_holds_no_plaintext():
    kek = bytes(range(32))
    blob = trust.encrypt(MODEL, kek)
    assert trust.is_encrypted(blob)
    assert MODEL[:64] not in blob and b"model bytes" not in blob
    assert trust.decrypt(blob, kek) == MODEL
    assert trust.encrypt(MODEL, kek) != blob  # fresh data key and nonce each time


def test_decrypt_with_the_wrong_key_names_both_keys():
    kek, wrong = bytes(32), bytes([1]) * 32
    blob = trust.encrypt(MODEL, kek)
    with pytest.raises(TrustError) as e:
        trust.decrypt(blob, wrong, "variant cpu")
    assert e.value.reason == "BadDecryption"
    assert trust.encryption_key_id(kek) in str(e.value) and trust.encryption_key_id(wrong) in str(e.value)
    assert "spec.encryption" in str(e.value)
    assert "encrypted for key" in str(e.value)


@pytest.mark.parametrize("where", ["header", "body", "tag"])
def test_encrypt_detects_a_flipped_byte_anywhere(where):
    kek = bytes(32)
    blob = bytearray(trust.encrypt(MODEL, kek))
    index = {"header": len(trust.MAGIC) + 4 + 10, "body": len(blob) // 2, "tag": len(blob) - 1}[where]
    blob[index] ^= 1
    with pytest.raises(TrustError) as e:
        trust.decrypt(bytes(blob), kek)
    assert e.value.reason == "BadDecryption"


@pytest.mark.parametrize(
    "blob",
    [b"", b"plain onnx", trust.MAGIC, trust.MAGIC + b"\xff\xff\xff\xff" + b"x" * 100, trust.MAGIC + b"\0\0\0\x05{}{}{"
     + b"x" * 32, trust.MAGIC + b"\0\0\0\x02[]" + b"x" * 32],
)
def test_decrypt_refuses_malformed_envelopes(blob):
    with pytest.raises(TrustError) as e:
        trust.decrypt(blob, bytes(32))
    assert e.value.reason == "BadDecryption"


def test_encryption_key_files_raw_hex_or_base64(tmp_path):
    key = bytes(range(32))
    for name, content in [("raw", key), ("hex", key.hex().encode() + b"\n"), ("b64", base64.b64encode(key) + b"\n")]:
        (tmp_path / name).write_bytes(content)
        assert trust.load_encryption_key(tmp_path / name) == key
    (tmp_path / "short").write_bytes(b"0123")
    with pytest.raises(TrustError, match="neither a PEM ECDSA P-256 key nor a 32-byte key.*keygen encryption"):
        trust.load_encryption_key(tmp_path / "short")
    assert trust.load_decryption_key(tmp_path / "hex") == key


def test_encrypt_for_a_public_key_decrypts_with_its_private_half_only(tmp_path):
    """ECDH-ES: the compiler encrypts with the public key and holds no secret; the node holds the private key."""
    private, public = trust.generate_signing_key()
    (tmp_path / "enc.key").write_bytes(private)
    (tmp_path / "enc.pub").write_bytes(public)
    pub = trust.load_encryption_key(tmp_path / "enc.pub")
    priv = trust.load_decryption_key(tmp_path / "enc.key")
    assert trust.encryption_key_id(pub) == trust.encryption_key_id(priv)
    blob = trust.encrypt(MODEL, pub)
    assert b"model bytes" not in blob and trust.decrypt(blob, priv) == MODEL
    other, _ = trust.generate_signing_key()
    (tmp_path / "other.key").write_bytes(other)
    with pytest.raises(TrustError) as e:
        trust.decrypt(blob, trust.load_decryption_key(tmp_path / "other.key"), "variant cpu")
    assert e.value.reason == "BadDecryption" and trust.encryption_key_id(pub) in str(e.value)
    with pytest.raises(TrustError, match="encrypted for key"):  # a 32-byte key for a pair's variant
        trust.decrypt(blob, bytes(32))
    with pytest.raises(TrustError, match="encrypted for key"):  # and the pair's key for a 32-byte key's
        trust.decrypt(trust.encrypt(MODEL, bytes(32)), priv)


def test_public_keys_from_a_mounted_secret_directory(tmp_path, keypair):
    """A Secret volume: one file per key plus kubelet's ..data links, which are skipped."""
    d = tmp_path / "keys"
    (d / "..2026_11_26").mkdir(parents=True)
    (d / "..2026_11_26" / "team.pub").write_bytes(keypair[1].read_bytes())
    (d / "..data").symlink_to("..2026_11_26")
    (d / "team.pub").symlink_to("..data/team.pub")
    (keys,) = trust.load_public_keys([d])
    sig = trust.sign_digest(trust.load_signing_key(keypair[0]), _digest(MODEL))
    assert trust.verify_digest([keys], _digest(MODEL), sig, "m") == trust.key_id(keys)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrustError, match="empty directory"):
        trust.load_public_keys([tmp_path / "empty"])
