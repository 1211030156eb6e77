"""``edgefleet-runtime fetch``: pull a model artifact into the node-local content-addressed cache.

Runs as the init container. Idempotent and offline-friendly: when ``DIR/sha256/<hex>`` already holds
bytes with the right digest nothing is downloaded. Writes go to ``DIR/tmp`` and are renamed into
place, so a crash never leaves a partial file under its digest name.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import tempfile
import urllib.parse
from pathlib import Path

from .digest import CHUNK, DigestError, blob_path, current_path, file_digest, parse_digest

log = logging.getLogger("edgefleet_runtime.fetch")

MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]


class FetchError(RuntimeError):
    pass


def _is_loopback(netloc: str) -> bool:
    host = urllib.parse.urlsplit("//" + netloc).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _write_stream(chunks, tmp_dir: Path) -> tuple[Path, str]:
    """Write chunks to a temp file, hashing on the way. Returns (path, digest)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="partial-")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name), "sha256:" + h.hexdigest()


def _file_chunks(path: str):
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _oci_chunks(ref: str, digest: str, insecure: bool):
    """Yield the bytes of the blob ``digest`` named by ``oci://host/repo[:tag][@sha256:...]``.

    The ref may name the blob itself or a manifest; for a manifest the layer whose digest equals
    ``digest`` is taken (or the only layer, verified afterwards)."""
    import oras.container
    import oras.provider

    target = ref[len("oci://") :]
    host = target.split("/", 1)[0]
    plain_http = insecure or _is_loopback(host)
    registry = oras.provider.Registry(hostname=host, insecure=plain_http)
    container = oras.container.Container(target)
    try:  # pull secrets mounted as a Docker config ($DOCKER_CONFIG or ~/.docker/config.json)
        registry.auth.load_configs(container)
    except Exception as e:  # noqa: BLE001 - anonymous pulls still work
        log.debug("no registry credentials loaded", extra={"error": str(e)})
    layer = digest
    if container.digest != digest:
        try:
            manifest = registry.get_manifest(container, allowed_media_type=MANIFEST_TYPES)
        except Exception as e:
            raise FetchError(f"cannot read manifest {ref}: {e}") from e
        layers = manifest.get("layers") or []
        match = [x for x in layers if x.get("digest") == digest]
        if match:
            layer = digest
        elif len(layers) == 1:
            layer = layers[0]["digest"]
        else:
            raise FetchError(f"manifest {ref} has {len(layers)} layers and none has digest {digest}")
    resp = registry.get_blob(container, layer, stream=True)
    if resp.status_code != 200:
        raise FetchError(f"registry answered {resp.status_code} for blob {layer} of {ref}")
    with resp:
        yield from resp.iter_content(chunk_size=CHUNK)


def _http_chunks(url: str, insecure: bool):
    import requests

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "http" and not (insecure or _is_loopback(parsed.netloc)):
        raise FetchError(f"refusing plain http for {url}; pass --insecure to allow it")
    with requests.get(url, stream=True, timeout=60) as resp:
        if resp.status_code != 200:
            raise FetchError(f"GET {url} answered {resp.status_code}")
        yield from resp.iter_content(chunk_size=CHUNK)


def point_current(cache: Path, name: str, digest: str) -> Path:
    """Atomically make ``cache/current/<name>`` a relative symlink to ``../sha256/<hex>``."""
    link = current_path(cache, name)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.join("..", "sha256", parse_digest(digest)), tmp)
    os.replace(tmp, link)
    return link


def fetch(ref: str, digest: str, cache: str | os.PathLike, name: str | None = None, insecure: bool = False) -> Path:
    """Make ``cache/sha256/<hex>`` hold the artifact; return its path. Raises DigestError/FetchError."""
    parse_digest(digest)
    cache = Path(cache)
    dest = blob_path(cache, digest)
    if dest.exists():
        if file_digest(dest) == digest:
            log.info("artifact already cached", extra={"digest": digest, "path": str(dest)})
            if name:
                point_current(cache, name, digest)
            return dest
        log.warning("cached artifact is corrupt; fetching it again", extra={"path": str(dest)})
        dest.chmod(0o644)
        dest.unlink()
    if ref.startswith("file://"):
        src = urllib.parse.unquote(urllib.parse.urlparse(ref).path)
        if not os.path.isfile(src):
            raise FetchError(f"{ref}: no such file")
        chunks = _file_chunks(src)
    elif ref.startswith("oci://"):
        chunks = _oci_chunks(ref, digest, insecure)
    elif ref.startswith(("https://", "http://")):
        chunks = _http_chunks(ref, insecure)
    elif ref.startswith("/"):
        chunks = _file_chunks(ref)
    else:
        raise FetchError(f"unsupported ref {ref!r}: use oci://host/repo@sha256:..., file:///path or https://")
    tmp, got = _write_stream(chunks, cache / "tmp")
    if got != digest:
        tmp.unlink()
        raise DigestError(f"digest mismatch for {ref}: expected {digest}, downloaded bytes have {got}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o444)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    log.info(
        "artifact fetched", extra={"ref": ref, "digest": digest, "path": str(dest), "size_bytes": dest.stat().st_size}
    )
    if name:
        point_current(cache, name, digest)
    return dest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
