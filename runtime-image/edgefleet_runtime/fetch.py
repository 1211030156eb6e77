"""``edgefleet-runtime fetch``: pull a model artifact into the node-local content-addressed cache.

Runs as the init container. Idempotent and offline-friendly: when ``DIR/sha256/<hex>`` already holds
bytes with the right digest nothing is downloaded. Writes go to ``DIR/tmp`` and are renamed into
place, so a crash never leaves a partial file under its digest name.

With a ``trust.Policy`` the variant's signature (OCI manifest annotation, ``<file>.sig`` or ``<url>.sig``)
is checked after the digest and before the rename: a refused variant never enters the cache. The signature
is kept as ``DIR/sha256/<hex>.sig`` so ``serve`` checks it again at load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import os
import random
import tempfile
import time
import urllib.parse
from pathlib import Path

from . import bounded, delta, trust
from .digest import CHUNK, DigestError, blob_path, current_path, file_digest, parse_digest

log = logging.getLogger("edgefleet_runtime.fetch")

MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]


class FetchError(RuntimeError):
    pass


class FetchLimit(FetchError):
    """A fetch hit one of its limits: ``limit`` is "size", "deadline" or "redirect" (bounded.LimitExceeded)."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


class RegistryUnreachable(FetchError):
    """The registry did not answer within the bounded retries (connection refused or reset, timeout, 502-504)."""


ATTEMPTS = 5  # requests to the registry per call, EDGEFLEET_FETCH_ATTEMPTS overrides
FIRST_DELAY_SECONDS = 1.0  # doubled after every failed attempt, with jitter, at most MAX_DELAY_SECONDS
MAX_DELAY_SECONDS = 8.0
RETRY_STATUS = frozenset({502, 503, 504})
MAX_BYTES = 16 << 30  # per fetch, EDGEFLEET_FETCH_MAX_BYTES overrides
DEADLINE_SECONDS = 1800.0  # per fetch, all requests and retries together; EDGEFLEET_FETCH_DEADLINE_SECONDS overrides
MAX_MANIFEST_BYTES = 4 << 20  # what distribution itself accepts for a manifest


DELTA_DEADLINE_SECONDS = 300.0  # a delta attempt, before the full download takes over


@dataclasses.dataclass(frozen=True)
class DeltaSource:
    """A delta to the variant being fetched: ``ref`` holds bytes with ``digest`` that turn the variant ``base``
    (when the cache holds it) into the target; ``size_bytes`` (0: unknown) caps the download."""

    base: str
    ref: str
    digest: str
    size_bytes: int = 0

    @classmethod
    def parse(cls, text: str) -> DeltaSource:
        """``base=sha256:..,digest=sha256:..,ref=REF[,sizeBytes=N]`` (the ``--delta`` flag); ValueError naming
        what is wrong."""
        fields: dict[str, str] = {}
        rest = text
        while rest:
            key, eq, rest = rest.partition("=")
            if not eq:
                raise ValueError(f"--delta {text!r}: expected base=sha256:..,digest=sha256:..,ref=REF")
            if key == "ref":  # last: a URL may hold commas
                value, rest = rest, ""
            else:
                value, _, rest = rest.partition(",")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"base", "digest", "ref", "sizeBytes"}
        missing = {"base", "digest", "ref"} - set(fields)
        if unknown or missing:
            raise ValueError(f"--delta {text!r}: unknown {sorted(unknown)}, missing {sorted(missing)}; expected "
                             "base=sha256:..,digest=sha256:..,ref=REF (ref last)")
        parse_digest(fields["base"])
        parse_digest(fields["digest"])
        if not fields.get("sizeBytes", "0").isdigit():
            raise ValueError(f"--delta {text!r}: sizeBytes must be a whole number of bytes")
        return cls(fields["base"], fields["ref"], fields["digest"], int(fields.get("sizeBytes", "0")))


def default_limits() -> bounded.Limits:
    """The init container's limits (EDGEFLEET_FETCH_MAX_BYTES, EDGEFLEET_FETCH_DEADLINE_SECONDS, else defaults)."""
    try:
        size = int(os.environ.get("EDGEFLEET_FETCH_MAX_BYTES", MAX_BYTES))
        seconds = float(os.environ.get("EDGEFLEET_FETCH_DEADLINE_SECONDS", DEADLINE_SECONDS))
    except ValueError:
        size, seconds = MAX_BYTES, DEADLINE_SECONDS
    return bounded.Limits(max_bytes=size, deadline_seconds=seconds)


def _attempts() -> int:
    try:
        return max(1, int(os.environ.get("EDGEFLEET_FETCH_ATTEMPTS", ATTEMPTS)))
    except ValueError:
        return ATTEMPTS


def with_retries(request, host: str, attempts: int | None = None, sleep=time.sleep):
    """``request()`` until the registry answers (any status but 502-504), at most ``attempts`` times with
    exponential backoff and jitter; every failed attempt is logged. Raises RegistryUnreachable."""
    import requests

    attempts = attempts or _attempts()
    started, delay, last = time.monotonic(), FIRST_DELAY_SECONDS, ""
    for attempt in range(1, attempts + 1):
        try:
            resp = request()
            if resp.status_code not in RETRY_STATUS:
                return resp
            last = f"HTTP {resp.status_code}"
        except (requests.ConnectionError, requests.Timeout) as e:
            last = f"{type(e).__name__}: {_short(e)}"
        if attempt < attempts:
            wait = min(delay, MAX_DELAY_SECONDS) * random.uniform(0.5, 1.0)
            log.warning("registry unreachable, retrying", extra={
                "registry": host, "attempt": attempt, "attempts": attempts, "retry_in_seconds": round(wait, 1),
                "error": last})
            sleep(wait)
            delay *= 2
    raise RegistryUnreachable(f"registry {host} unreachable: {attempts} attempts over "
                              f"{time.monotonic() - started:.0f} s failed, last: {last}")


def _short(error: Exception) -> str:
    """The innermost reason of a requests/urllib3 error ("[Errno 111] Connection refused"), not its repr chain."""
    text = str(error)
    at = text.find("[Errno")
    if at >= 0:
        return text[at:].split("'")[0].split('"')[0].rstrip(")")[:200]
    return text[:200]


TOKEN_FILE_ENV = "EDGEFLEET_REGISTRY_TOKEN_FILE"  # a projected ServiceAccount token the operator mounted for pushes
SERVICE_ACCOUNT_USER = "serviceaccount"  # the username the store's token service expects with such a token


def pusher_login() -> tuple[str, str] | None:
    """The credentials this pod pushes to the store the operator named with: the projected ServiceAccount token
    at $EDGEFLEET_REGISTRY_TOKEN_FILE, re-read on every call (the kubelet rotates it); None without one. Sources a
    user names are never read with it."""
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise FetchError(f"${TOKEN_FILE_ENV} {path}: {e.strerror}; the pod's registry token volume is missing") from e
    return (SERVICE_ACCOUNT_USER, token) if token else None


def registry_client(host: str, plain_http: bool, limits: bounded.Limits, deadline: bounded.Deadline,
                    attempts: int | None = None, login: tuple[str, str] | None = None):
    """An ORAS registry client whose requests end by ``deadline``, refuse redirects that lower security, and
    retry a bounded number of times (``attempts``; ORAS's own retry sleeps 3, 5, 11, 29, 83 s, silently, and its
    requests have no timeout). With ``login`` (user, password) the registry's token service gets those
    credentials (nothing is written to a Docker config); without, tokens are requested anonymously."""
    import oras.provider

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, deadline.left()))

    class Registry(oras.provider.Registry):
        def do_request(self, *args, **kwargs):
            unretried = oras.provider.Registry.do_request.__wrapped__
            return with_retries(lambda: unretried(self, *args, **kwargs), host, attempts, sleep=sleep)

    registry = Registry(hostname=host, insecure=plain_http)
    bounded.guard_session(registry.session, limits, deadline, allow_plain_http=plain_http)
    if login:
        registry.auth.set_basic_auth(*login)
    _renew_token_on_401(registry.auth)
    return registry


def _renew_token_on_401(auth) -> None:
    """ORAS keeps the first token it got and sends it again when the registry asks for more (a push after a pull
    needs a token with the push scope): a 401 now always gets a token for the scope the registry names."""
    plain = auth.authenticate_request

    def authenticate(original, headers, refresh=False):
        return plain(original, headers, refresh=refresh or original.status_code == 401)

    auth.authenticate_request = authenticate


def registry_for(host: str, insecure: bool, seconds: float, attempts: int | None = None,
                 login: tuple[str, str] | None = None):
    """``registry_client`` for one operation of at most ``seconds``, with the one plain-HTTP rule: plain only when
    ``insecure`` is set or the registry is on loopback."""
    limits = bounded.Limits(max_bytes=0, deadline_seconds=seconds)
    return registry_client(host, insecure or _is_loopback(host), limits, bounded.Deadline(seconds), attempts, login)


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


def _oci_chunks(ref: str, digest: str, insecure: bool, found: dict, limits: bounded.Limits,
                deadline: bounded.Deadline, credentials: bool = True):
    """Yield the bytes of the blob ``digest`` named by ``oci://host/repo[:tag][@sha256:...]``.

    The ref may name the blob itself or a manifest; for a manifest the layer whose digest equals
    ``digest`` is taken (or the only layer, verified afterwards). ``found["signature"]``: the manifest's
    signature annotation. ``credentials``: load pull secrets ($DOCKER_CONFIG); False pulls anonymously."""
    import oras.container

    target = ref[len("oci://") :]
    host = target.split("/", 1)[0]
    plain_http = insecure or _is_loopback(host)
    registry = registry_client(host, plain_http, limits, deadline)
    container = oras.container.Container(target)
    if credentials:
        try:  # pull secrets mounted as a Docker config ($DOCKER_CONFIG or ~/.docker/config.json)
            registry.auth.load_configs(container)
        except Exception as e:  # noqa: BLE001 - anonymous pulls still work
            log.debug("no registry credentials loaded", extra={"error": str(e)})
    layer = digest
    found["where"] = f"{ref} names the blob itself; signatures are read from its manifest: give the manifest's ref"
    if not digest or container.digest != digest:
        found["where"] = f"the manifest of {ref} has no {trust.SIGNATURE_ANNOTATION} annotation"
        manifest = _manifest(registry, container, ref, limits, deadline)
        found["signature"] = (manifest.get("annotations") or {}).get(trust.SIGNATURE_ANNOTATION)
        layers = manifest.get("layers") or []
        match = [x for x in layers if digest and x.get("digest") == digest]
        if match:
            layer = digest
        elif len(layers) == 1:
            layer = layers[0]["digest"]
        else:
            raise FetchError(f"manifest {ref} has {len(layers)} layers and none has digest {digest or '(none given)'}")
    resp = registry.get_blob(container, layer, stream=True)
    if resp.status_code != 200:
        resp.close()
        raise FetchError(f"registry answered {resp.status_code} for blob {layer} of {ref}")
    yield from bounded.body(resp, limits, deadline, f"blob {layer} of {ref}")


def _manifest(registry, container, ref: str, limits: bounded.Limits, deadline: bounded.Deadline) -> dict:
    """The manifest ``container`` names, read within the deadline and at most MAX_MANIFEST_BYTES."""
    import json

    url = f"{registry.prefix}://{container.manifest_url()}"
    try:
        resp = registry.do_request(url, "GET", headers={"Accept": ", ".join(MANIFEST_TYPES)}, stream=True)
    except (RegistryUnreachable, bounded.LimitExceeded):
        raise
    except Exception as e:
        raise FetchError(f"cannot read manifest {ref}: {type(e).__name__}: {_short(e)}") from e
    if resp.status_code != 200:
        resp.close()
        raise FetchError(f"cannot read manifest {ref}: the registry answered HTTP {resp.status_code}")
    small = bounded.Limits(min(limits.max_bytes, MAX_MANIFEST_BYTES), limits.deadline_seconds)
    text = b"".join(bounded.body(resp, small, deadline, f"manifest of {ref}"))
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise FetchError(f"manifest {ref} is not JSON") from e
    if not isinstance(manifest, dict):
        raise FetchError(f"manifest {ref} is not a JSON object")
    return manifest


def _http_chunks(url: str, insecure: bool, limits: bounded.Limits, deadline: bounded.Deadline):
    parsed = urllib.parse.urlparse(url)
    plain_ok = insecure or _is_loopback(parsed.netloc)
    if parsed.scheme == "http" and not plain_ok:
        raise FetchError(f"refusing plain http for {bounded.safe_url(url)}; pass --insecure to allow it")
    try:
        yield from bounded.get(url, limits, allow_plain_http=parsed.scheme == "http" and plain_ok,
                               deadline=deadline)
    except bounded.HTTPStatusError as e:
        raise FetchError(str(e)) from e


def _http_signature(url: str, deadline: bounded.Deadline) -> str | None:
    """``<url>.sig`` (at most a signature's size); None when the server has none (404)."""
    sig_url = url + trust.SIGNATURE_SUFFIX
    small = bounded.Limits(trust.MAX_SIGNATURE_BYTES, deadline.seconds)
    plain = urllib.parse.urlparse(url).scheme == "http"  # fetch() already applied its plain-http rule
    try:
        data = b"".join(bounded.get(sig_url, small, allow_plain_http=plain, deadline=deadline))
    except bounded.HTTPStatusError as e:
        if e.status == 404:
            return None
        raise FetchError(str(e)) from e
    except bounded.LimitExceeded as e:
        if e.limit != "size":
            raise
        raise trust.TrustError("BadSignature", f"{bounded.safe_url(sig_url)} is larger than a signature") from None
    return data.decode("ascii", "replace").strip()


def _check_signature(policy, digest: str, signature: str | None, ref: str, where: str) -> None:
    try:
        signer = policy.check(digest, signature, f"variant {ref}")
    except trust.TrustError as e:
        if e.reason == "Unsigned" and where:
            raise trust.TrustError(e.reason, f"{e} ({where})") from None
        raise
    if signer:
        log.info("signature verified", extra={"ref": ref, "digest": digest, "key": signer})


def _keep_signature(dest: Path, signature: str | None) -> None:
    """``<blob>.sig`` beside the blob, written before the blob is renamed into place."""
    sig = Path(trust.signature_path(dest))
    if signature is None or len(signature) > trust.MAX_SIGNATURE_BYTES:  # none, or junk no key would verify
        sig.unlink(missing_ok=True)
        return
    tmp = sig.with_name(f".{sig.name}.tmp-{os.getpid()}")
    tmp.write_text(signature + "\n")
    os.replace(tmp, sig)


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


def fetch(
    ref: str,
    digest: str,
    cache: str | os.PathLike,
    name: str | None = None,
    insecure: bool = False,
    policy: trust.Policy | None = None,
    limits: bounded.Limits | None = None,
    deltas: list[DeltaSource] | tuple[DeltaSource, ...] = (),
    stats: dict | None = None,
) -> Path:
    """Make ``cache/sha256/<hex>`` hold the artifact; return its path. Raises DigestError/FetchError (FetchLimit
    past ``limits``, default_limits() when None), and trust.TrustError when ``policy`` refuses the signature.

    ``deltas``: deltas to this artifact from variants the cache may hold; the first whose base is cached is
    tried, and any failure of it falls back to the full download (``fetch_delta``). ``stats`` (when given)
    gets ``method`` ("cached", "delta" or "full"), ``bytes`` downloaded and ``delta_error`` when one failed."""
    parse_digest(digest)
    limits = limits or default_limits()
    deadline = bounded.Deadline(limits.deadline_seconds)
    policy = policy or trust.Policy()
    cache = Path(cache)
    dest = blob_path(cache, digest)
    if dest.exists():
        if file_digest(dest) == digest and _cached_signature_ok(policy, dest, digest, ref):
            log.info("artifact already cached", extra={"digest": digest, "path": str(dest)})
            if stats is not None:
                stats.update(method="cached", bytes=0)
            if name:
                point_current(cache, name, digest)
            return dest
        log.warning("cached artifact is corrupt or not trusted; fetching it again", extra={"path": str(dest)})
        dest.chmod(0o644)
        dest.unlink()
    for source in deltas:
        if blob_path(cache, source.base).exists():
            if fetch_delta(source, ref, digest, cache, insecure, policy, limits, stats):
                if name:
                    point_current(cache, name, digest)
                return dest
            break
    found: dict = {"signature": None, "where": ""}
    if ref.startswith("file://") or ref.startswith("/"):
        src = urllib.parse.unquote(urllib.parse.urlparse(ref).path) if ref.startswith("file://") else ref
        if not os.path.isfile(src):
            raise FetchError(f"{ref}: no such file")
        chunks = _file_chunks(src)
        found["signature"] = trust.read_signature_file(trust.signature_path(src))
        found["where"] = f"no {trust.signature_path(src)}"
    elif ref.startswith("oci://"):
        chunks = _oci_chunks(ref, digest, insecure, found, limits, deadline)
    elif ref.startswith(("https://", "http://")):
        chunks = _http_chunks(ref, insecure, limits, deadline)
        found["where"] = f"no {ref}{trust.SIGNATURE_SUFFIX}"
    else:
        raise FetchError(f"unsupported ref {ref!r}: use oci://host/repo@sha256:..., file:///path or https://")
    with _limits_as_fetch_errors():
        tmp, got = _write_stream(chunks, cache / "tmp")
    try:
        if got != digest:
            raise DigestError(f"digest mismatch for {ref}: expected {digest}, downloaded bytes have {got}")
        if ref.startswith(("https://", "http://")) and policy.checks_signatures:
            with _limits_as_fetch_errors():  # after _http_chunks passed its plain-http rule
                found["signature"] = _http_signature(ref, deadline)
        _check_signature(policy, digest, found["signature"], ref, found["where"])
    except BaseException:
        tmp.unlink()
        raise
    _install(tmp, dest, found["signature"])
    log.info(
        "artifact fetched", extra={"ref": ref, "digest": digest, "path": str(dest), "size_bytes": dest.stat().st_size}
    )
    if stats is not None:
        stats.update(method="full", bytes=stats.get("bytes", 0) + dest.stat().st_size)
    if name:
        point_current(cache, name, digest)
    return dest


def _install(tmp: Path, dest: Path, signature: str | None) -> None:
    """Rename a verified temp file into the cache under its digest, its signature beside it first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _keep_signature(dest, signature)
    tmp.chmod(0o444)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)


def fetch_delta(source: DeltaSource, ref: str, digest: str, cache: Path, insecure: bool, policy: trust.Policy,
                limits: bounded.Limits, stats: dict | None = None) -> bool:
    """Build the variant ``digest`` from the cached base and the delta, verify it (digest, then signature read
    from ``ref`` as for a full download) and install it. False on any failure (logged, ``stats["delta_error"]``):
    the caller then downloads the full variant; nothing unverified ever enters the cache."""
    small = bounded.Limits(min(limits.max_bytes, source.size_bytes or limits.max_bytes),
                           min(limits.deadline_seconds, DELTA_DEADLINE_SECONDS))
    deadline = bounded.Deadline(small.deadline_seconds)
    fetched = 0
    try:
        base = blob_path(cache, source.base).read_bytes()
        data = b"".join(_capped(_source_chunks(source.ref, source.digest, insecure, {}, small, deadline),
                                small.max_bytes, source.ref))
        fetched = len(data)
        if "sha256:" + hashlib.sha256(data).hexdigest() != source.digest:
            raise DigestError(f"delta {source.ref} does not have its digest {source.digest}")
        if delta.header(data)[2] != digest:
            raise delta.DeltaError(f"delta {source.ref} is for {delta.header(data)[2]}, not {digest}")
        out = delta.apply(base, data, limits.max_bytes)
        signature, where = _target_signature(ref, digest, insecure, policy, small, deadline)
        _check_signature(policy, digest, signature, ref, where)
        tmp, got = _write_stream([out], cache / "tmp")
        if got != digest:  # delta.apply checked it; a cheap second look before the rename
            tmp.unlink()
            raise DigestError(f"delta result has {got}, not {digest}")
        _install(tmp, blob_path(cache, digest), signature)
    except Exception as e:  # noqa: BLE001 - every failure of the delta path falls back to the full download
        log.warning("delta not used; fetching the full variant", extra={
            "delta": source.ref, "base": source.base, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if stats is not None:
            stats.update(delta_error=f"{type(e).__name__}: {str(e)[:300]}", bytes=stats.get("bytes", 0) + fetched)
        return False
    log.info("artifact built from a delta", extra={
        "ref": ref, "digest": digest, "delta": source.ref, "base": source.base, "delta_bytes": fetched,
        "size_bytes": len(out)})
    if stats is not None:
        stats.update(method="delta", bytes=stats.get("bytes", 0) + fetched)
    return True


def _source_chunks(ref: str, digest: str, insecure: bool, found: dict, limits: bounded.Limits,
                   deadline: bounded.Deadline):
    """The bytes ``ref`` names (file://, oci://, https://), within ``limits``; no signature read."""
    if ref.startswith("file://") or ref.startswith("/"):
        src = urllib.parse.unquote(urllib.parse.urlparse(ref).path) if ref.startswith("file://") else ref
        if not os.path.isfile(src):
            raise FetchError(f"{ref}: no such file")
        return _file_chunks(src)
    if ref.startswith("oci://"):
        return _oci_chunks(ref, digest, insecure, found, limits, deadline)
    if ref.startswith(("https://", "http://")):
        return _http_chunks(ref, insecure, limits, deadline)
    raise FetchError(f"unsupported ref {ref!r}: use oci://host/repo@sha256:..., file:///path or https://")


def _capped(chunks, max_bytes: int, what: str):
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise FetchLimit("size", f"{what} is larger than {max_bytes} bytes")
        yield chunk


def _target_signature(ref: str, digest: str, insecure: bool, policy: trust.Policy, limits: bounded.Limits,
                      deadline: bounded.Deadline) -> tuple[str | None, str]:
    """(signature, where it was looked for) of the variant ``ref`` without downloading it: ``<file>.sig``,
    ``<url>.sig`` or the manifest's annotation, the places a full download reads."""
    if ref.startswith("file://") or ref.startswith("/"):
        src = urllib.parse.unquote(urllib.parse.urlparse(ref).path) if ref.startswith("file://") else ref
        return trust.read_signature_file(trust.signature_path(src)), f"no {trust.signature_path(src)}"
    if not policy.checks_signatures:
        return None, ""
    if ref.startswith(("https://", "http://")):
        if ref.startswith("http://") and not (insecure or _is_loopback(urllib.parse.urlparse(ref).netloc)):
            raise FetchError(f"refusing plain http for {bounded.safe_url(ref)}; pass --insecure to allow it")
        return _http_signature(ref, deadline), f"no {ref}{trust.SIGNATURE_SUFFIX}"
    if ref.startswith("oci://"):
        import oras.container

        target = ref[len("oci://"):]
        host = target.split("/", 1)[0]
        registry = registry_client(host, insecure or _is_loopback(host), limits, deadline)
        container = oras.container.Container(target)
        with contextlib.suppress(Exception):
            registry.auth.load_configs(container)
        if container.digest == digest:
            return None, f"{ref} names the blob itself; signatures are read from its manifest: give the manifest's ref"
        manifest = _manifest(registry, container, ref, limits, deadline)
        annotation = (manifest.get("annotations") or {}).get(trust.SIGNATURE_ANNOTATION)
        return annotation, f"the manifest of {ref} has no {trust.SIGNATURE_ANNOTATION} annotation"
    raise FetchError(f"unsupported ref {ref!r}")


@contextlib.contextmanager
def _limits_as_fetch_errors():
    try:
        yield
    except bounded.LimitExceeded as e:
        raise FetchLimit(e.limit, str(e)) from None


def read_source(ref: str, limits: bounded.Limits, digest: str = "", insecure: bool = False) -> bytes:
    """The bytes of a source a user named (https://, or oci:// pulled anonymously: no pull secret of this process
    is ever offered to it), within ``limits``; FetchLimit names the limit hit, FetchError anything else."""
    deadline = bounded.Deadline(limits.deadline_seconds)
    if ref.startswith("oci://"):
        chunks = _oci_chunks(ref, digest, insecure, {}, limits, deadline, credentials=False)
    elif ref.startswith(("https://", "http://")):
        chunks = _http_chunks(ref, insecure, limits, deadline)
    else:
        raise FetchError(f"unsupported source {ref!r}: use https:// or oci://host/repo[:tag|@sha256:...]")
    import requests

    try:
        with _limits_as_fetch_errors():
            return b"".join(chunks)
    except requests.RequestException as e:  # refused, reset, TLS: the reason, never a response body
        raise FetchError(f"{type(e).__name__}: {_short(e)}") from e


def _cached_signature_ok(policy, dest: Path, digest: str, ref: str) -> bool:
    """A cached blob is reused only when the policy accepts the signature kept beside it (offline nodes)."""
    if not policy.checks_signatures:
        return True
    try:
        policy.check(digest, trust.read_signature_file(trust.signature_path(dest)), f"cached variant {digest}")
        return True
    except trust.TrustError as e:
        log.warning("cached variant's signature is not accepted; fetching it again", extra={"error": str(e)})
        return False


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
