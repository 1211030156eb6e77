"""Signed and encrypted model artifacts: what a node may trust, with keys it holds offline.

Signatures are cosign ``sign-blob`` signatures: base64 of a DER ECDSA P-256 signature over the SHA-256
of the artifact bytes. ``cosign verify-blob --key pub.pem --signature file.sig --insecure-ignore-tlog``
and ``openssl dgst -sha256 -verify pub.pem`` check them; keys are PEM (PKCS#8 private, SubjectPublicKeyInfo
public). Because the signed hash is the artifact's sha256, a node that already hashed the bytes for the
digest check verifies without reading them again.

Where a signature lives:

* file / node cache: ``<blob>.sig`` beside the blob (``DIR/sha256/<hex>.sig``);
* OCI: the manifest annotation ``io.edgefleet.signature`` (one push, one pull, no referrers API needed);
* https: ``<url>.sig``.

Encryption at rest (``encrypt``/``decrypt``): AES-256-GCM under a random data key, which is wrapped
(RFC 3394 AES key wrap) by a 32-byte key-encryption key, or, so that whoever encrypts holds no secret, for
a P-256 public key (ECDH-ES with an ephemeral key + HKDF-SHA256, then AES key wrap) whose private half is
in the Secret the runtime mounts. The file is
``MAGIC | u32 header length | header JSON | ciphertext+tag``; the header (algorithm, key id, wrapped key,
nonce) is the GCM associated data, so neither part can be swapped. Signatures cover the encrypted file:
a node verifies what it stores without holding the decryption key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

SIGNATURE_ANNOTATION = "io.edgefleet.signature"
SIGNATURE_SUFFIX = ".sig"
MAX_SIGNATURE_BYTES = 1024  # a DER P-256 signature is at most 72 bytes (96 in base64)
MAGIC = b"\x89EFENC\x01\n"
MAX_HEADER_BYTES = 4096
KEY_BYTES = 32


class TrustError(ValueError):
    """A variant this node must not use. ``reason``: Unsigned, BadSignature, BadKey, Encrypted or BadDecryption."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- keys
def generate_signing_key() -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key pair as (PKCS#8 private PEM, public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return private, public_pem(key.public_key())


def public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public_key) -> str:
    """``sha256:<first 16 hex>`` of the DER public key: names a key in messages without printing it."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


def _read(path: str | os.PathLike, what: str, limit: int = 64 << 10) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise TrustError("BadKey", f"cannot read the {what} {os.fspath(path)}: {e.strerror or e}") from e
    if len(data) > limit:
        raise TrustError("BadKey", f"the {what} {os.fspath(path)} is larger than {limit} bytes; is it the right file?")
    return data


def _load_key(load, data: bytes, where, reason: str = "BadKey"):
    """``load(data)`` (a cryptography loader); a key on a curve or of a type cryptography does not support is a
    TrustError naming ``where``, as a malformed one is (ValueError/TypeError pass through to the caller)."""
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return load(data)
    except UnsupportedAlgorithm as e:
        raise TrustError(reason, f"{os.fspath(where)}: the key is on an unsupported curve or of an unsupported "
                                 f"type ({e}); edgefleet uses ECDSA/ECDH P-256 keys (secp256r1)") from None


def _require_p256(key, path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or key.curve.name != "secp256r1":
        raise TrustError(
            "BadKey",
            f"{os.fspath(path)} is not an ECDSA P-256 key; make one with `edgefleet keygen signing PREFIX` "
            "or `cosign generate-key-pair` + `cosign public-key`",
        )


def load_signing_key(path: str | os.PathLike):
    """An ECDSA P-256 private key from an unencrypted PEM file (PKCS#8 or SEC1)."""
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "signing key")
    try:
        key = _load_key(lambda d: serialization.load_pem_private_key(d, password=None), data, path)
    except (ValueError, TypeError) as e:
        raise TrustError(
            "BadKey", f"{os.fspath(path)} is not an unencrypted PEM private key ({e}); a cosign.key is encrypted in "
            "cosign's own format (sign with `cosign sign-blob` instead); make a PEM key with "
            "`edgefleet keygen signing PREFIX`"
        ) from e
    _require_p256(key, path)
    return key


def _key_files(paths) -> list:
    """The files named, a directory standing for its files (a mounted Secret: its ``..data`` entries skipped)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if not n.startswith("."))
            files += [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
            if not names:
                raise TrustError("BadKey", f"{os.fspath(path)} is an empty directory; put PEM public keys in it")
        else:
            files.append(path)
    return files


def load_public_keys(paths) -> list:
    """ECDSA P-256 public keys from PEM files or directories of them; one file may hold several PEM blocks."""
    from cryptography.hazmat.primitives import serialization

    keys = []
    for path in _key_files(paths):
        data = _read(path, "public key")
        blocks = [b for b in data.split(b"-----END PUBLIC KEY-----") if b"-----BEGIN PUBLIC KEY-----" in b]
        if not blocks:
            raise TrustError("BadKey", f"{os.fspath(path)} holds no PEM public key (-----BEGIN PUBLIC KEY-----)")
        for block in blocks:
            try:
                key = _load_key(serialization.load_pem_public_key, block + b"-----END PUBLIC KEY-----\n", path)
            except ValueError as e:
                raise TrustError("BadKey", f"{os.fspath(path)}: unreadable PEM public key: {e}") from e
            _require_p256(key, path)
            keys.append(key)
    return keys


def _symmetric_key(data: bytes, path) -> bytes:
    """A 32-byte key: the raw bytes, 64 hex characters or base64 of 32 bytes."""
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    for decode in (lambda t: bytes.fromhex(t.decode("ascii")), lambda t: base64.b64decode(t, validate=True)):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) == KEY_BYTES:
            return key
    raise TrustError(
        "BadKey",
        f"{os.fspath(path)} is neither a PEM ECDSA P-256 key nor a 32-byte key (raw, 64 hex characters or "
        "base64); make a pair with `edgefleet keygen encryption PREFIX` or a key with `head -c 32 /dev/urandom`",
    )


def load_encryption_key(path: str | os.PathLike):
    """What encrypts: a PEM P-256 public key (ECDH-ES: the compiler needs no secret) or a 32-byte key."""
    data = _read(path, "encryption key", limit=4096)
    if b"PRIVATE KEY-----" in data:
        raise TrustError("BadKey", f"{os.fspath(path)} is a private key; encrypt for its public half (PREFIX.pub)")
    if b"-----BEGIN PUBLIC KEY-----" not in data:
        return _symmetric_key(data, path)
    return public_key_from_pem(data, os.fspath(path))


def public_key_from_pem(pem: bytes, where: str):
    """One P-256 public key from PEM text; TrustError naming ``where`` otherwise."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = _load_key(serialization.load_pem_public_key, pem, where)
    except ValueError as e:
        raise TrustError("BadKey", f"{where}: unreadable PEM public key: {e}") from e
    _require_p256(key, where)
    return key


def load_decryption_key(path: str | os.PathLike):
    """What decrypts: the PEM P-256 private key of an encryption pair, or the 32-byte key itself."""
    data = _read(path, "decryption key", limit=4096)
    return load_signing_key(path) if b"PRIVATE KEY-----" in data else _symmetric_key(data, path)


def encryption_key_id(key) -> str:
    """Names an encryption key (either half of a pair alike, or a 32-byte key by a hash) in headers and messages."""
    if isinstance(key, bytes):
        return "sha256:" + hashlib.sha256(b"edgefleet-kek\0" + key).hexdigest()[:16]
    return key_id(key.public_key() if hasattr(key, "private_bytes") else key)


# ------------------------------------------------------------------------------------------ signatures
def _sha256_bytes(digest: str) -> bytes:
    from .digest import parse_digest

    return bytes.fromhex(parse_digest(digest))


def sign_digest(private_key, digest: str) -> str:
    """The cosign sign-blob signature (base64 DER) of the bytes whose sha256 is ``digest``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    der = private_key.sign(_sha256_bytes(digest), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    return base64.b64encode(der).decode("ascii")


def verify_digest(public_keys: list, digest: str, signature: str | bytes | None, what: str) -> str:
    """Check ``signature`` over the bytes with sha256 ``digest`` against any of ``public_keys``.

    Returns the id of the key that signed; raises TrustError (Unsigned / BadSignature) naming ``what``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    if signature is None or not (signature.strip() if isinstance(signature, (str, bytes)) else signature):
        raise TrustError("Unsigned", f"{what} has no signature; a trusted signature is required")
    if len(signature) > MAX_SIGNATURE_BYTES:  # it came from the network: bound the work before decoding it
        raise TrustError("BadSignature", f"the signature of {what} is longer than {MAX_SIGNATURE_BYTES} bytes")
    try:
        der = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise TrustError("BadSignature", f"the signature of {what} is not base64: {e}") from e
    hashed = _sha256_bytes(digest)
    for key in public_keys:
        try:
            key.verify(der, hashed, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            return key_id(key)
        except InvalidSignature:
            continue
    ids = ", ".join(key_id(k) for k in public_keys) or "none"
    raise TrustError(
        "BadSignature", f"the signature of {what} ({digest}) does not verify with any trusted key ({ids})"
    )


def read_signature_file(path: str | os.PathLike) -> str | None:
    """The signature stored in ``path``; None when there is no such file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise TrustError("BadSignature", f"{os.fspath(path)} is larger than a signature ({MAX_SIGNATURE_BYTES} bytes)")
    return data.decode("ascii", "replace").strip()


def signature_path(blob: str | os.PathLike) -> str:
    return os.fspath(blob) + SIGNATURE_SUFFIX


# ------------------------------------------------------------------------------------------ encryption
def is_encrypted(head: bytes) -> bool:
    return head.startswith(MAGIC)


ECDH_WRAP = "ECDH-ES+A256KW"


def _ecdh_kek(private_key, public_key, epk_der: bytes) -> bytes:
    """The AES key-wrap key both sides derive: HKDF-SHA256 of the ECDH secret, bound to the ephemeral key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = private_key.exchange(ec.ECDH(), public_key)
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"edgefleet " + ECDH_WRAP.encode() + epk_der).derive(
        shared
    )


def _wrap(key, data_key: bytes) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    if isinstance(key, bytes):
        return {"wrap": "A256KW", "kek": encryption_key_id(key), "key": aes_key_wrap(key, data_key)}
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    epk = ephemeral.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    wrapped = aes_key_wrap(_ecdh_kek(ephemeral, key, epk), data_key)
    return {"wrap": ECDH_WRAP, "kek": encryption_key_id(key), "key": wrapped, "epk": epk}


def encrypt(plaintext: bytes, key) -> bytes:
    """AES-256-GCM under a fresh data key wrapped for ``key`` (a 32-byte key: AES key wrap; a P-256 public key:
    ECDH-ES with an ephemeral key, then AES key wrap); see the module docstring for the layout."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data_key, nonce = os.urandom(KEY_BYTES), os.urandom(12)
    fields = {"alg": "A256GCM", **_wrap(key, data_key), "nonce": nonce}
    header = json.dumps(
        {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in fields.items()},
        separators=(",", ":"),
    ).encode()
    prefix = MAGIC + struct.pack(">I", len(header)) + header
    return prefix + AESGCM(data_key).encrypt(nonce, plaintext, prefix)


def _header(blob: bytes, what: str) -> tuple[dict, int]:
    if not is_encrypted(blob):
        raise TrustError("BadDecryption", f"{what} is not an edgefleet encrypted artifact")
    start = len(MAGIC) + 4
    if len(blob) < start:
        raise TrustError("BadDecryption", f"{what} is truncated")
    (length,) = struct.unpack(">I", blob[len(MAGIC) : start])
    if length > MAX_HEADER_BYTES or len(blob) < start + length + 16:
        raise TrustError("BadDecryption", f"{what} has a malformed encryption header")
    try:
        header = json.loads(blob[start : start + length])
        if not isinstance(header, dict) or header.get("alg") != "A256GCM":
            raise ValueError("unknown algorithm")
        if header.get("wrap") not in ("A256KW", ECDH_WRAP):
            raise ValueError(f"unknown key wrap {header.get('wrap')!r}")
        for name in ("key", "nonce") + (("epk",) if header["wrap"] == ECDH_WRAP else ()):
            header[name] = base64.b64decode(header[name], validate=True)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, binascii.Error) as e:
        raise TrustError("BadDecryption", f"{what} has a malformed encryption header: {e}") from e
    return header, start + length


def _unwrap(header: dict, key, what: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    wrong = TrustError(
        "BadDecryption",
        f"{what} is encrypted for key {header.get('kek')}; the decryption key given is "
        f"{encryption_key_id(key)} (mount the Secret of the key the EdgeModel's spec.encryption names)",
    )
    if (header["wrap"] == ECDH_WRAP) == isinstance(key, bytes):
        raise wrong
    try:
        if header["wrap"] == ECDH_WRAP:
            where = f"the ephemeral key in the encryption header of {what}"
            epk = _load_key(serialization.load_der_public_key, header["epk"], where, "BadDecryption")
            curve = getattr(getattr(epk, "curve", None), "name", type(epk).__name__)
            if curve != "secp256r1":
                raise TrustError("BadDecryption", f"{where} is a {curve} key; edgefleet envelopes use P-256")
            return aes_key_unwrap(_ecdh_kek(key, epk, header["epk"]), header["key"])
        return aes_key_unwrap(key, header["key"])
    except TrustError:
        raise
    except (InvalidUnwrap, ValueError) as e:
        raise wrong from e


def decrypt(blob: bytes, key, what: str = "the model") -> bytes:
    """The plaintext of an ``encrypt`` result; TrustError naming both keys when ``key`` is not the right one."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header, body = _header(blob, what)
    data_key = _unwrap(header, key, what)
    try:
        return AESGCM(data_key).decrypt(header["nonce"], blob[body:], blob[:body])
    except (InvalidTag, ValueError) as e:
        raise TrustError("BadDecryption", f"{what} fails authenticated decryption: it was altered") from e


# ---------------------------------------------------------------------------------------------- policy
@dataclass
class Policy:
    """What this node trusts: signatures by any of ``public_keys`` (required or only checked when present)
    and the key that decrypts encrypted variants."""

    public_keys: list = field(default_factory=list)
    require_signature: bool = False
    decryption_key: object = None  # a 32-byte key or an EC private key (load_decryption_key)

    @classmethod
    def from_files(cls, public_keys=(), require_signature=False, decryption_key_file=None) -> Policy:
        keys = load_public_keys(public_keys or ())
        if require_signature and not keys:
            raise TrustError("BadKey", "--require-signature needs at least one --public-key FILE")
        key = load_decryption_key(decryption_key_file) if decryption_key_file else None
        return cls(keys, require_signature, key)

    @property
    def checks_signatures(self) -> bool:
        return bool(self.public_keys)

    def check(self, digest: str, signature: str | None, what: str) -> str | None:
        """Raise TrustError when the policy refuses; the signing key's id (or None: not checked)."""
        if not self.public_keys:
            return None
        if signature is None and not self.require_signature:
            return None
        return verify_digest(self.public_keys, digest, signature, what)
