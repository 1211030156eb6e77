"""`edgefleet images build | lock | list`."""

from __future__ import annotations

import json
import sys

import click

from ..toolchain import BuildError
from . import build as builder
from .debian import PackageError
from .oci import PushError
from .sbom import SbomError
from .signing import ImageTrustError
from .spec import IMAGES
from .wheels import WheelError

ERRORS = (PackageError, WheelError, PushError, SbomError, BuildError, ImageTrustError)


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def _names(only: tuple[str, ...], all_images: bool) -> list[str]:
    unknown = [n for n in only if n not in IMAGES]
    if unknown:
        raise click.BadParameter(f"unknown image(s) {unknown}; choose from {sorted(IMAGES)}", param_hint="--only")
    if only:
        return list(only)
    return [n for n, s in IMAGES.items() if all_images or s.default]


@click.group()
def images() -> None:
    """Build edgefleet's container images without a Docker engine (Debian packages + pinned wheels + crane)."""


@images.command()
@click.option("--only", multiple=True, help="Image name (repeatable); default: every default image.")
@click.option("--all", "all_images", is_flag=True, help="Also the GPU images (runtime-gpu, runtime-jetson).")
@click.option("--platform", "platforms", help="Comma-separated, e.g. linux/amd64,linux/arm64 (default: each "
              "image's platforms).")
@click.option("--push", "dest", help="REGISTRY/PREFIX to copy the built images to, e.g. "
              "registry.example:5000/edgefleet.")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the --push registry.")
@click.option("--sign-key", "sign_key", envvar="EDGEFLEET_IMAGE_SIGNING_KEY_FILE", type=click.Path(dir_okay=False),
              help="ECDSA P-256 private key (PEM, `edgefleet keygen signing`): sign each pushed image in cosign's "
                   "format (env EDGEFLEET_IMAGE_SIGNING_KEY_FILE).")
def build(only, all_images, platforms, dest, insecure, sign_key) -> None:
    """Build the images (cached: a warm build takes seconds); optionally push (and sign) them."""
    names = _names(only, all_images)
    if sign_key and not dest:
        raise click.BadParameter("signing needs --push REGISTRY/PREFIX (signatures live beside the pushed "
                                 "image)", param_hint="--sign-key")
    try:
        key = _signing_key(sign_key) if sign_key else None
        built = builder.build(names, platforms.split(",") if platforms else None, echo=_echo)
        for b in built:
            click.echo(f"{b.name:18} {b.digest}  {b.compressed_bytes / 1e6:7.1f} MB  {','.join(b.platforms)}")
        if dest:
            digests = builder.push(names, dest, insecure, echo=_echo)
            if key is not None:
                _sign_all([f"{dest.rstrip('/')}/{n}@{d}" for n, d in digests.items()], key, insecure)
            click.echo(builder.helm_set_line(dest, digests))
    except ERRORS as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


@images.command()
@click.option("--only", multiple=True, help="Image name (repeatable); default: all images.")
@click.option("--debian", "debian_too", is_flag=True, help="Also re-resolve the Debian packages (apt update).")
def lock(only, debian_too) -> None:
    """Resolve Debian packages and wheels (by sha256) for each image and platform; write the lock files."""
    try:
        builder.lock(_names(only, True), debian_too, echo=_echo)
    except ERRORS as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


@images.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json) -> None:
    """The built images: name, ref, digest, compressed and unpacked size, contents."""
    index = builder.read_index()
    rows = [index.get(n) or {"name": n, "ref": "(not built)", "digest": "", "compressedBytes": 0,
                             "unpackedBytes": 0, "contains": IMAGES[n].contains} for n in IMAGES]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:18} {r['digest'][:19] or '-':19} {r['compressedBytes'] / 1e6:7.1f} MB "
                   f"{r['unpackedBytes'] / 1e6:7.1f} MB  {r['contains']}")


def _signing_key(path: str):
    from edgefleet_runtime.trust import TrustError, load_signing_key

    try:
        return load_signing_key(path)
    except TrustError as err:
        raise click.BadParameter(str(err), param_hint="--key / --sign-key") from err


def _sign_all(refs: list[str], key, insecure: bool) -> None:
    from edgefleet_runtime.trust import key_id

    from . import signing

    for ref in refs:
        image = signing.parse_ref(ref, insecure)
        signing.sign(image, key, insecure)
        _echo(f"[sign] {image} with {key_id(key.public_key())} -> {image.repo}:{image.signature_tag}")


@images.command(name="sign")
@click.argument("refs", nargs=-1, required=True)
@click.option("--key", "key_file", required=True, envvar="EDGEFLEET_IMAGE_SIGNING_KEY_FILE",
              type=click.Path(dir_okay=False), help="ECDSA P-256 private key (PEM), e.g. `edgefleet keygen signing`.")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry.")
def sign_(refs, key_file, insecure) -> None:
    """Sign REGISTRY/REPO@sha256:... (or :TAG, resolved to its digest) the way cosign does (a
    sha256-<hex>.sig manifest beside it): `cosign verify --key PUB --insecure-ignore-tlog` accepts it."""
    key = _signing_key(key_file)
    try:
        _sign_all(list(refs), key, insecure)
    except ImageTrustError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


@images.command(name="verify")
@click.argument("refs", nargs=-1, required=True)
@click.option("--public-key", "public_keys", multiple=True, required=True, type=click.Path(exists=True),
              help="Trusted ECDSA P-256 public key (PEM file or a directory of them; repeatable).")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry.")
def verify_(refs, public_keys, insecure) -> None:
    """Check that each image is signed (cosign format) by a trusted key; exit 1 naming the first that is not.
    Signatures by `cosign sign --key` verify too."""
    from edgefleet_runtime.trust import TrustError, load_public_keys

    from . import signing

    try:
        keys = load_public_keys(public_keys)
    except TrustError as err:
        raise click.BadParameter(str(err), param_hint="--public-key") from err
    failed = False
    for ref in refs:
        try:
            image = signing.parse_ref(ref, insecure)
            click.echo(f"verified {image}: signed by {signing.verify(image, keys, insecure)}")
        except ImageTrustError as err:
            click.echo(f"error: {err.reason}: {err}", err=True)
            failed = True
    if failed:
        click.echo("  fix: sign with `edgefleet images sign REF --key KEY` (or `edgefleet images build --push "
                   "DEST --sign-key KEY`) using a key whose public half you trust", err=True)
        sys.exit(1)
