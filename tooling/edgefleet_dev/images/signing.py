"""Image signatures in cosign's format, made with the same P-256 keys as the model variants.

A signature of ``REPO@sha256:<hex>`` is an OCI manifest tagged ``REPO:sha256-<hex>.sig`` (cosign's tag
convention, for registries without the referrers API). Each of its layers is a simple-signing payload
(``application/vnd.dev.cosign.simplesigning.v1+json``) naming the image digest, with the base64 DER ECDSA
signature of that payload in the layer annotation ``dev.cosignproject.cosign/signature``. So
``cosign verify --key team.pub --insecure-ignore-tlog REPO@sha256:<hex>``, sigstore policy-controller and
Kyverno ``verifyImages`` accept what this module writes, and ``verify`` accepts what ``cosign sign --key``
writes (without a transparency log: an offline cluster has none).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import requests

from ..net import RegistryTokenAuth

PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
ACCEPT = ",".join([MANIFEST_MEDIA_TYPE, "application/vnd.oci.image.index.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json",
                   "application/vnd.docker.distribution.manifest.list.v2+json"])
MAX_PAYLOAD_BYTES = 64 << 10


class ImageTrustError(RuntimeError):
    """An image is unsigned, wrongly signed, or its signature could not be read or written.

    ``reason``: Unsigned, BadSignature or Registry."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    digest: str  # sha256:<hex>

    @property
    def repo(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def signature_tag(self) -> str:
        return self.digest.replace(":", "-") + ".sig"

    def __str__(self) -> str:
        return f"{self.repo}@{self.digest}"


class Registry:
    """The few distribution-API calls a signature needs (plain HTTP when ``insecure``)."""

    def __init__(self, registry: str, insecure: bool):
        self.base = f"{'http' if insecure else 'https'}://{registry}/v2"
        self.session = requests.Session()
        self.session.auth = RegistryTokenAuth()

    def _call(self, method: str, url: str, **kw) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=30, **kw)
        except requests.RequestException as err:
            raise ImageTrustError("Registry", f"{method} {url}: {err}") from err

    def manifest(self, repository: str, reference: str) -> tuple[dict, bytes, str] | None:
        """(manifest, raw bytes, digest) or None when the registry has no such manifest."""
        resp = self._call("GET", f"{self.base}/{repository}/manifests/{reference}", headers={"Accept": ACCEPT})
        if resp.status_code == 404:
            return None
        _check(resp, f"reading {repository}:{reference}")
        return resp.json(), resp.content, "sha256:" + hashlib.sha256(resp.content).hexdigest()

    def blob(self, repository: str, digest: str, limit: int) -> bytes:
        resp = self._call("GET", f"{self.base}/{repository}/blobs/{digest}", stream=True)
        _check(resp, f"reading blob {digest} of {repository}")
        data = resp.raw.read(limit + 1, decode_content=True)
        if len(data) > limit:
            raise ImageTrustError("BadSignature", f"blob {digest} of {repository} is larger than {limit} bytes")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ImageTrustError("BadSignature", f"blob {digest} of {repository} does not match its digest")
        return data

    def put_blob(self, repository: str, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self._call("HEAD", f"{self.base}/{repository}/blobs/{digest}").status_code != 200:
            start = self._call("POST", f"{self.base}/{repository}/blobs/uploads/")
            _check(start, f"starting an upload to {repository}")
            location = start.headers["Location"]
            if location.startswith("/"):
                location = self.base.removesuffix("/v2") + location
            sep = "&" if "?" in location else "?"
            done = self._call("PUT", f"{location}{sep}digest={digest}", data=data,
                              headers={"Content-Type": "application/octet-stream"})
            _check(done, f"uploading blob {digest} to {repository}")
        return {"digest": digest, "size": len(data)}

    def put_manifest(self, repository: str, tag: str, manifest: dict) -> None:
        body = json.dumps(manifest, separators=(",", ":")).encode()
        resp = self._call("PUT", f"{self.base}/{repository}/manifests/{tag}", data=body,
                          headers={"Content-Type": manifest["mediaType"]})
        _check(resp, f"writing {repository}:{tag}")


def _check(resp: requests.Response, what: str) -> None:
    if resp.status_code >= 300:
        raise ImageTrustError("Registry", f"{what}: HTTP {resp.status_code} {resp.text.strip()[:300]}")


def parse_ref(ref: str, insecure: bool) -> ImageRef:
    """REGISTRY/REPO@sha256:<hex> as is; REGISTRY/REPO[:TAG] resolved to the digest the registry holds now."""
    ref = ref.removeprefix("oci://").removeprefix("docker://")
    name, _, digest = ref.partition("@")
    if "/" not in name:
        raise ImageTrustError("Registry", f"{ref!r} names no registry; give REGISTRY/REPO@sha256:<hex>")
    registry, repository = name.split("/", 1)
    tag = "latest"
    last = repository.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = repository.rsplit(":", 1)
    if digest:
        if not (digest.startswith("sha256:") and len(digest) == 71):
            raise ImageTrustError("Registry", f"{ref!r}: the digest must be sha256:<64 hex>")
        return ImageRef(registry, repository, digest)
    found = Registry(registry, insecure).manifest(repository, tag)
    if found is None:
        raise ImageTrustError("Registry", f"{registry}/{repository}:{tag} does not exist")
    return ImageRef(registry, repository, found[2])


def payload(ref: ImageRef) -> bytes:
    """The simple-signing payload cosign signs (Go's json.Marshal: this key order, no spaces)."""
    doc = {"critical": {"identity": {"docker-reference": ref.repo},
                        "image": {"docker-manifest-digest": ref.digest},
                        "type": PAYLOAD_TYPE},
           "optional": None}
    return json.dumps(doc, separators=(",", ":")).encode()


def _config(layers: list[dict]) -> bytes:
    """The image config go-containerregistry writes for a signature image (cosign's empty image + layers)."""
    doc = {"architecture": "", "created": "0001-01-01T00:00:00Z",
           "history": [{"created": "0001-01-01T00:00:00Z"} for _ in layers], "os": "",
           "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}, "config": {}}
    return json.dumps(doc, separators=(",", ":")).encode()


def sign(ref: ImageRef, private_key, insecure: bool) -> str:
    """Sign ``ref`` and attach the signature at ``sha256-<hex>.sig`` (added to the ones there); returns it."""
    from edgefleet_runtime.trust import sign_digest

    reg = Registry(ref.registry, insecure)
    if reg.manifest(ref.repository, ref.digest) is None:
        raise ImageTrustError("Registry", f"{ref} does not exist; push the image before signing it")
    body = payload(ref)
    signature = sign_digest(private_key, "sha256:" + hashlib.sha256(body).hexdigest())
    layer = {"mediaType": PAYLOAD_MEDIA_TYPE, **reg.put_blob(ref.repository, body),
             "annotations": {SIGNATURE_ANNOTATION: signature}}
    existing = reg.manifest(ref.repository, ref.signature_tag)
    layers = [lay for lay in (existing[0].get("layers", []) if existing else [])
              if not _same_signer(lay, layer["digest"], private_key.public_key())]
    layers.append(layer)
    config = {"mediaType": CONFIG_MEDIA_TYPE, **reg.put_blob(ref.repository, _config(layers))}
    reg.put_manifest(ref.repository, ref.signature_tag,
                     {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config, "layers": layers})
    return signature


def _same_signer(layer: dict, payload_digest: str, public_key) -> bool:
    """A layer this key already signed over the same payload: replaced, so signing again adds nothing
    (ECDSA signatures differ each time)."""
    from edgefleet_runtime.trust import TrustError, verify_digest

    if layer.get("digest") != payload_digest:
        return False
    try:
        verify_digest([public_key], payload_digest, layer.get("annotations", {}).get(SIGNATURE_ANNOTATION), "")
    except TrustError:
        return False
    return True


def verify(ref: ImageRef, public_keys: list, insecure: bool) -> str:
    """The id of a trusted key that signed ``ref``; ImageTrustError (Unsigned / BadSignature) otherwise."""
    from edgefleet_runtime.trust import TrustError, verify_digest

    reg = Registry(ref.registry, insecure)
    found = reg.manifest(ref.repository, ref.signature_tag)
    layers = [lay for lay in (found[0].get("layers", []) if found else [])
              if lay.get("mediaType") == PAYLOAD_MEDIA_TYPE and SIGNATURE_ANNOTATION in lay.get("annotations", {})]
    if not layers:
        raise ImageTrustError("Unsigned", f"{ref} has no signature ({ref.repo}:{ref.signature_tag} "
                                          "holds none); sign it with `edgefleet images sign`")
    problems = []
    for layer in layers:
        body = reg.blob(ref.repository, layer["digest"], MAX_PAYLOAD_BYTES)
        try:
            signer = verify_digest(public_keys, layer["digest"], layer["annotations"][SIGNATURE_ANNOTATION], str(ref))
        except TrustError as err:
            problems.append(str(err))
            continue
        problem = _claim_problem(body, ref)
        if problem is None:
            return signer
        problems.append(problem)
    raise ImageTrustError("BadSignature", f"{ref}: no signature verifies with a trusted key: " + "; ".join(problems))


def _claim_problem(body: bytes, ref: ImageRef) -> str | None:
    """Why a correctly signed payload does not vouch for ``ref`` (as cosign checks it), or None."""
    try:
        doc = json.loads(body)
        critical = doc["critical"]
        kind, digest = critical["type"], critical["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError):
        return "a signed payload is not a simple-signing document"
    if kind != PAYLOAD_TYPE:
        return f"a signed payload has type {kind!r}, not {PAYLOAD_TYPE!r}"
    if digest != ref.digest:
        return f"a signature is for {digest}, not {ref.digest}"
    return None
