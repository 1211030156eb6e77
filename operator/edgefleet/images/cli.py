"""`edgefleet images build | lock | list`."""

from __future__ import annotations

import json
import sys

import click

from ..devcluster.components import BuildError
from . import build as builder
from .debian import PackageError
from .oci import PushError
from .sbom import SbomError
from .spec import IMAGES
from .wheels import WheelError

ERRORS = (PackageError, WheelError, PushError, SbomError, BuildError)


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
def build(only, all_images, platforms, dest, insecure) -> None:
    """Build the images (cached: a warm build takes seconds); optionally push them."""
    names = _names(only, all_images)
    try:
        built = builder.build(names, platforms.split(",") if platforms else None, echo=_echo)
        for b in built:
            click.echo(f"{b.name:18} {b.digest}  {b.compressed_bytes / 1e6:7.1f} MB  {','.join(b.platforms)}")
        if dest:
            digests = builder.push(names, dest, insecure, echo=_echo)
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
