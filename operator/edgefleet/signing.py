"""``edgefleet sign`` / ``verify`` / ``keygen``: signed (and encrypted) variants for people who bring their own.

Signatures are cosign sign-blob signatures (edgefleet_runtime.trust): ``cosign verify-blob`` and
``openssl dgst -sha256 -verify`` check what ``edgefleet sign`` writes, and ``edgefleet verify`` checks theirs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

EXIT_REFUSED = 1  # the signature is missing or does not verify
EXIT_USAGE = 2


def _fail(code: int, message: str, fix: str | None = None):
    click.echo(f"error: {message}", err=True)
    if fix:
        click.echo(f"  fix: {fix}", err=True)
    sys.exit(code)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; refuse to overwrite a key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        _fail(EXIT_USAGE, f"{path} exists; not overwriting a key", "pick another path or remove it first")
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@click.group("keygen")
def keygen_command() -> None:
    """Make key pairs (P-256): for signing, or for encrypting variants (private halves go into Secrets)."""


@keygen_command.command("signing")
@click.argument("prefix", type=click.Path(dir_okay=False))
def keygen_signing(prefix):
    """Write PREFIX.key (private, 0600) and PREFIX.pub (public) for `edgefleet sign` / the compiler."""
    from edgefleet_runtime.trust import generate_signing_key

    private, public = generate_signing_key()
    _write_new(Path(prefix + ".key"), private, 0o600)
    _write_new(Path(prefix + ".pub"), public, 0o644)
    click.echo(f"{prefix}.key\n{prefix}.pub")


@keygen_command.command("encryption")
@click.argument("prefix", type=click.Path(dir_okay=False))
def keygen_encryption(prefix):
    """Write PREFIX.key (private, 0600: the runtime's Secret) and PREFIX.pub (public: the EdgeModel's
    spec.encryption.publicKey, or `edgefleet compile --encryption-key-file`). Variants are encrypted for the
    public key, so the operator and the compiler hold no secret. A 32-byte symmetric key file works too."""
    from edgefleet_runtime.trust import generate_signing_key

    private, public = generate_signing_key()  # the same P-256 pair, used for ECDH-ES
    _write_new(Path(prefix + ".key"), private, 0o600)
    _write_new(Path(prefix + ".pub"), public, 0o644)
    click.echo(f"{prefix}.key\n{prefix}.pub")


@click.command("sign")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_file", required=True, envvar="EDGEFLEET_SIGNING_KEY_FILE",
              help="ECDSA P-256 private key (PEM), e.g. from `edgefleet keygen signing`.")
@click.option("--output", default=None, help="Signature file (default: FILE.sig).")
@click.option("--push", default=None, metavar="oci://HOST[:PORT]/REPO",
              help="Also push FILE with its signature (manifest annotation io.edgefleet.signature).")
@click.option("--name", default=None, help="Tag prefix for --push (default: the file's stem).")
@click.option("--media-type", default="application/octet-stream", show_default=True, help="Layer media type.")
@click.option("--encrypt-for", "encrypt_for", default=None, type=click.Path(exists=True, dir_okay=False),
              help="First encrypt FILE (AES-256-GCM) for this P-256 public key (or 32-byte key) into FILE.enc, "
                   "then sign and push that: the node cache will hold only ciphertext.")
def sign_command(file, key_file, output, push, name, media_type, encrypt_for):
    """Sign FILE (a model variant) the way the compiler signs the variants it publishes."""
    from edgefleet_runtime.digest import file_digest
    from edgefleet_runtime.trust import SIGNATURE_ANNOTATION, TrustError, key_id, load_signing_key, sign_digest

    try:
        key = load_signing_key(key_file)
        if encrypt_for:
            file = _encrypted_copy(file, encrypt_for)
    except TrustError as e:
        _fail(EXIT_USAGE, str(e))
    digest = file_digest(file)
    signature = sign_digest(key, digest)
    out = Path(output or file + ".sig")
    out.write_text(signature + "\n")
    click.echo(f"signed {file} ({digest}) with {key_id(key.public_key())}: {out}")
    if push:
        from .artifacts import StoreError, open_store

        try:
            ref = open_store(push).put(Path(file).read_bytes(), name=name or Path(file).stem, media_type=media_type,
                                       annotations={SIGNATURE_ANNOTATION: signature}, filename=Path(file).name)
        except StoreError as e:
            _fail(EXIT_USAGE, str(e), "check --push (oci://HOST:PORT/REPO) and that the registry is reachable")
        click.echo(f"pushed {ref.ref} digest {ref.digest}")


def _encrypted_copy(file: str, key_file: str) -> str:
    from edgefleet_runtime.trust import encrypt, encryption_key_id, load_encryption_key

    key = load_encryption_key(key_file)
    out = file + ".enc"
    Path(out).write_bytes(encrypt(Path(file).read_bytes(), key))
    click.echo(f"encrypted {file} for {encryption_key_id(key)}: {out}")
    return out


@click.command("verify")
@click.argument("target")
@click.option("--public-key", "public_keys", multiple=True, required=True, type=click.Path(exists=True),
              help="Trusted ECDSA P-256 public key (PEM; repeatable: any of them may have signed).")
@click.option("--signature", default=None, help="Signature file (default: TARGET.sig, or the OCI manifest's).")
@click.option("--digest", default=None, help="Also require the bytes to have this sha256:<hex>.")
def verify_command(target, public_keys, signature, digest):
    """Check that TARGET (a file or oci://HOST/REPO@sha256:...) is signed by a trusted key; exit 1 if not."""
    from edgefleet_runtime.trust import TrustError, load_public_keys, read_signature_file, verify_digest

    try:
        keys = load_public_keys(public_keys)
    except TrustError as e:
        _fail(EXIT_USAGE, str(e))
    if target.startswith("oci://"):
        got, stored = _oci_digest_and_signature(target)
    else:
        if not os.path.isfile(target):
            _fail(EXIT_USAGE, f"{target}: no such file", "give a model file or an oci:// reference")
        from edgefleet_runtime.digest import file_digest

        got = file_digest(target)
        stored = read_signature_file(target + ".sig") if signature is None else None
    if signature is not None:
        stored = read_signature_file(signature)
        if stored is None:
            _fail(EXIT_USAGE, f"--signature {signature}: no such file")
    if digest and digest != got:
        _fail(EXIT_REFUSED, f"{target} has digest {got}, not {digest}")
    try:
        signer = verify_digest(keys, got, stored, target)
    except TrustError as e:
        _fail(EXIT_REFUSED, f"{e.reason}: {e}", "sign it with `edgefleet sign` using a key whose public half you trust")
    click.echo(f"verified {target} ({got}): signed by {signer}")


def _oci_digest_and_signature(ref: str) -> tuple[str, str | None]:
    """The layer's digest (pulled and hashed) and the manifest's signature annotation."""
    import hashlib

    from edgefleet_runtime.trust import SIGNATURE_ANNOTATION

    from .artifacts import OCIStore, StoreError, open_store
    from .artifacts.store import parse_oci

    try:
        registry, repository, _ = parse_oci(ref)
        store = open_store(f"oci://{registry}/{repository}")
        assert isinstance(store, OCIStore)  # an oci:// URI opens the OCI store
        data = store.get(ref, "")
        annotations = store.annotations(ref)
    except StoreError as e:
        _fail(EXIT_USAGE, str(e), "check the reference and that the registry is reachable")
    except Exception as e:  # noqa: BLE001 - registry / HTTP errors from oras
        _fail(EXIT_USAGE, f"cannot read {ref}: {e}")
    return "sha256:" + hashlib.sha256(data).hexdigest(), annotations.get(SIGNATURE_ANNOTATION)
