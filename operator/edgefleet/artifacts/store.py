"""Local directory and OCI (ORAS) artifact stores, both content-addressed by sha256."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from edgefleet_runtime.trust import SIGNATURE_ANNOTATION

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


class DigestError(ValueError):
    """Bytes do not match the expected digest, or a digest string is malformed."""


class StoreError(RuntimeError):
    """The store could not write or read an artifact (registry unreachable, unknown ref, ...)."""


def parse_digest(digest: str) -> str:
    """Return the hex part of ``sha256:<64 hex>``."""
    m = _DIGEST.match(digest.strip()) if isinstance(digest, str) else None
    if not m:
        raise DigestError(f"digest {digest!r} is not of the form sha256:<64 lowercase hex>")
    return m.group(1)


def verify(data: bytes, digest: str) -> None:
    want = parse_digest(digest)
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise DigestError(f"content digest sha256:{got} does not match the expected {digest}")


@dataclass(frozen=True)
class ArtifactRef:
    ref: str  # where to fetch it: file:///.../sha256/<hex> or oci://host/repo@sha256:<manifest>
    digest: str  # sha256:<hex> of the model bytes
    sizeBytes: int
    mediaType: str


@runtime_checkable
class ArtifactStore(Protocol):
    def put(self, data: bytes, *, name: str, media_type: str, annotations: dict[str, str] | None = None,
            filename: str = "model") -> ArtifactRef: ...

    def get(self, ref: str, digest: str) -> bytes: ...


class LocalStore:
    """A directory: ``root/sha256/<hex>`` holds the bytes, ``root/sha256/<hex>.json`` the metadata and
    ``root/sha256/<hex>.sig`` the signature, when the variant is signed.

    Writes are atomic (temp file + rename in the same directory), so a reader never sees a partial
    artifact. The layout matches the runtime's node-local cache.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def _blob(self, hexdigest: str) -> Path:
        return self.root / "sha256" / hexdigest

    def put(self, data: bytes, *, name: str, media_type: str, annotations: dict[str, str] | None = None,
            filename: str = "model") -> ArtifactRef:
        hexd = hashlib.sha256(data).hexdigest()
        blob = self._blob(hexd)
        blob.parent.mkdir(parents=True, exist_ok=True)
        meta = {"name": name, "mediaType": media_type, "filename": filename, "annotations": annotations or {}}
        if not blob.exists():
            _atomic_write(blob, data)
        _atomic_write(blob.with_name(hexd + ".json"), json.dumps(meta, indent=2, sort_keys=True).encode())
        signature = (annotations or {}).get(SIGNATURE_ANNOTATION)
        if signature:  # beside the blob, as in the node cache (edgefleet_runtime.trust)
            _atomic_write(blob.with_name(hexd + ".sig"), signature.encode())
        return ArtifactRef(ref=blob.as_uri(), digest=f"sha256:{hexd}", sizeBytes=len(data), mediaType=media_type)

    def get(self, ref: str, digest: str) -> bytes:
        hexd = parse_digest(digest)
        path = self._blob(hexd)
        if ref.startswith("file://"):
            path = Path(ref[len("file://"):])
        elif ref:
            path = Path(ref)
        if not path.exists():
            raise StoreError(f"artifact {ref or digest} is not in {self.root}")
        data = path.read_bytes()
        verify(data, digest)
        return data

    def metadata(self, digest: str) -> dict:
        return json.loads(self._blob(parse_digest(digest)).with_suffix(".json").read_text())

    def digests(self) -> list[str]:
        d = self.root / "sha256"
        return sorted(f"sha256:{p.name}" for p in d.iterdir() if len(p.name) == 64) if d.exists() else []


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


OPERATION_SECONDS = 300.0  # one push or pull of the operator's store, every request and retry together


class OCIStore:
    """An OCI registry through ORAS: one manifest per variant, the report as manifest annotations (and the
    signature, ``io.edgefleet.signature``, when the variant is signed: one push, no referrers API needed).

    ``registry`` is ``host:port``; plain http when ``insecure`` (the dev cluster's CNCF distribution).
    Tags are ``<name>-<first 12 hex of the digest>`` so the same bytes always land on the same tag.
    """

    def __init__(self, registry: str, repository: str = "edgefleet/models", insecure: bool = True,
                 username: str | None = None, password: str | None = None,
                 operation_seconds: float = OPERATION_SECONDS):
        self.registry = registry.rstrip("/")
        self.repository = repository.strip("/")
        self.insecure = insecure
        self._login = (username, password or "") if username else None
        self.operation_seconds = operation_seconds

    @property
    def _client(self):
        """A registry client for one operation: every request times out, the retries (bounded, with jitter) and
        the operation end within ``operation_seconds``, redirects never lower security
        (``edgefleet_runtime.fetch.registry_client``, the client the runtime fetches with)."""
        from edgefleet_runtime.bounded import Deadline, Limits
        from edgefleet_runtime.fetch import registry_client

        limits = Limits(max_bytes=0, deadline_seconds=self.operation_seconds)
        return registry_client(self.registry, self.insecure, limits, Deadline(limits.deadline_seconds),
                               login=self._login)

    def _target(self, suffix: str) -> str:
        return f"{self.registry}/{self.repository}{suffix}"

    def put(self, data: bytes, *, name: str, media_type: str, annotations: dict[str, str] | None = None,
            filename: str = "model") -> ArtifactRef:
        hexd = hashlib.sha256(data).hexdigest()
        tag = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{name}-{hexd[:12]}")[:128]
        ann = {str(k): str(v) for k, v in (annotations or {}).items()}
        ann["io.edgefleet.digest"] = f"sha256:{hexd}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            try:
                resp = self._client.push(
                    target=self._target(f":{tag}"), files=[f"{path}:{media_type}"],
                    manifest_annotations=ann, disable_path_validation=True, quiet=True,
                )
            except Exception as e:  # requests / oras errors
                raise StoreError(f"push to {self._target(':' + tag)} failed: {e}") from e
        if getattr(resp, "status_code", 201) >= 300:
            raise StoreError(f"push to {self._target(':' + tag)} failed: HTTP {resp.status_code} {resp.text[:200]}")
        manifest_digest = resp.headers.get("Docker-Content-Digest") if hasattr(resp, "headers") else None
        suffix = f"@{manifest_digest}" if manifest_digest else f":{tag}"
        return ArtifactRef(ref=f"oci://{self._target(suffix)}", digest=f"sha256:{hexd}", sizeBytes=len(data),
                           mediaType=media_type)

    def get(self, ref: str, digest: str) -> bytes:
        """Pull ``ref`` (oci://host/repo@sha256:.. or :tag) and return the single layer, verified."""
        target = ref[len("oci://"):] if ref.startswith("oci://") else ref
        with tempfile.TemporaryDirectory() as tmp:
            try:
                files = self._client.pull(target=target, outdir=tmp)
            except Exception as e:
                raise StoreError(f"pull of {ref} failed: {e}") from e
            files = [f for f in files if Path(f).is_file()]
            if len(files) != 1:
                raise StoreError(f"{ref} holds {len(files)} files; a model variant has exactly one layer")
            data = Path(files[0]).read_bytes()
        if digest:
            verify(data, digest)
        return data

    def annotations(self, ref: str) -> dict[str, str]:
        target = ref[len("oci://"):] if ref.startswith("oci://") else ref
        manifest = self._client.get_manifest(target)
        return dict(manifest.get("annotations", {}))


def push_file(uri: str, data: bytes, media_type: str, insecure: bool = False, username: str | None = None,
              password: str | None = None) -> None:
    """Push ``data`` as a one-file artifact to ``oci://HOST:PORT/REPO:TAG`` (read back with ``OCIStore.get(uri,
    "")``); the plain-HTTP rule and login are ``open_store``'s."""
    registry, repository, suffix = parse_oci(uri)
    if not suffix.startswith(":"):
        raise StoreError(f"{uri!r}: a one-file artifact needs a tag, oci://HOST:PORT/REPO:TAG")
    store = open_store(f"oci://{registry}/{repository}", insecure, username, password)
    assert isinstance(store, OCIStore)  # an oci:// URI opens the OCI store
    target = f"{registry}/{repository}{suffix}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        path.write_bytes(data)
        try:
            resp = store._client.push(target=target, files=[f"{path}:{media_type}"],
                                      disable_path_validation=True, quiet=True)
        except Exception as e:  # requests / oras errors
            raise StoreError(f"push to {target} failed: {e}") from e
    if getattr(resp, "status_code", 201) >= 300:
        raise StoreError(f"push to {target} failed: HTTP {resp.status_code} {resp.text[:200]}")


def parse_oci(uri: str) -> tuple[str, str, str]:
    """``oci://host:port/repo/path(:tag|@sha256:..)`` -> (registry, repository, suffix)."""
    rest = uri[len("oci://"):] if uri.startswith("oci://") else uri
    registry, _, path = rest.partition("/")
    if not path:
        raise StoreError(f"{uri!r}: expected oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]")
    suffix = ""
    if "@" in path:
        path, at, d = path.partition("@")
        suffix = at + d
    elif ":" in path.rsplit("/", 1)[-1]:
        path, colon, tag = path.rpartition(":")
        suffix = colon + tag
    return registry, path, suffix


def open_store(spec: str | os.PathLike, insecure: bool = False, username: str | None = None,
               password: str | None = None) -> ArtifactStore:
    """``oci://host:port/repo`` -> OCIStore (plain http when `insecure`, for loopback registries, or with
    EDGEFLEET_OCI_INSECURE=1; logged in when `username` is given), anything else -> LocalStore. The operator
    passes its credentials through ``own_store`` only."""
    s = str(spec)
    if s.startswith("oci://"):
        registry, repo, _ = parse_oci(s)
        host = registry.rsplit(":", 1)[0] if ":" in registry.rsplit("]", 1)[-1] else registry  # without the port
        insecure = (insecure or host in ("127.0.0.1", "localhost", "[::1]")
                    or os.environ.get("EDGEFLEET_OCI_INSECURE") == "1")
        return OCIStore(registry, repo, insecure=insecure, username=username, password=password)
    return LocalStore(s)


def pod_store(spec: str) -> ArtifactStore:
    """The store the operator named for this pod (``--out`` of a compile Job, ``--store`` of a federated run), with
    the pod's registry token (edgefleet_runtime.fetch.pusher_login) when it has one."""
    from edgefleet_runtime.fetch import pusher_login

    return open_store(spec, False, *(pusher_login() or (None, None)))


def own_store(spec: str, ref: str | None = None, insecure: bool = False, username: str | None = None,
              password: str | None = None) -> ArtifactStore:
    """The operator's own artifact store ``spec`` (settings.artifact_store), opened for ``ref`` (default: the
    store itself) with the operator's credentials.

    The one place those credentials are chosen: a ``ref`` on another registry than ``spec``'s is refused
    (StoreError) before anything is sent, so they never reach a host a user names. Sources users name
    (EdgeModel and FederatedTraining URIs) never come here: they are read anonymously
    (edgefleet_runtime.fetch.read_source)."""
    target = ref or spec
    if str(spec).startswith("oci://") and _registry_of(target) != _registry_of(str(spec)):
        raise StoreError(f"{target} is not in the operator's artifact store {spec}: the operator's store "
                         "credentials are used for that registry only")
    return open_store(target, insecure, username, password)


def _registry_of(uri: str) -> str:
    """``host[:port]`` of an oci:// reference, lowercased; "" for anything else."""
    return parse_oci(uri)[0].lower() if uri.startswith("oci://") else ""
