"""A CycloneDX SBOM per image (Debian packages and wheels, with versions and hashes), attached to the image
in the registry as an OCI 1.1 referrer (ORAS), so `oras discover` and scanners find it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import oras.oci
import oras.provider

from ..net import RegistryTokenAuth
from .debian import Deb
from .spec import LICENSE, SOURCE_URL, VERSION, ImageSpec

MEDIA_TYPE = "application/vnd.cyclonedx+json"


class SbomError(RuntimeError):
    """The SBOM could not be attached or copied."""


def cyclonedx(spec: ImageSpec, inventory: dict[str, tuple[list[Deb], list[tuple[str, str, str]]]],
              digest: str) -> dict:
    components: dict[str, dict] = {}
    for _arch, (debs, wheels) in sorted(inventory.items()):
        for d in debs:
            purl = f"pkg:deb/debian/{d.name}@{d.version}?arch={d.arch}&distro=debian-12"
            components[purl] = {"type": "library", "name": d.name, "version": d.version, "purl": purl,
                                "bom-ref": purl, "hashes": [{"alg": "SHA-256", "content": d.sha256}]}
        for name, version, sha in wheels:
            purl = f"pkg:pypi/{name.lower()}@{version}"
            entry = components.setdefault(purl, {"type": "library", "name": name, "version": version, "purl": purl,
                                                 "bom-ref": purl, "hashes": []})
            if {"alg": "SHA-256", "content": sha} not in entry["hashes"]:
                entry["hashes"].append({"alg": "SHA-256", "content": sha})
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
        "serialNumber": f"urn:uuid:{_uuid_from(digest)}",
        "metadata": {"component": {"type": "container", "name": f"edgefleet/{spec.name}", "version": VERSION,
                                   "bom-ref": digest, "licenses": [{"license": {"id": LICENSE}}],
                                   "externalReferences": [{"type": "vcs", "url": SOURCE_URL}]}},
        "components": [components[k] for k in sorted(components)],
    }


def _uuid_from(digest: str) -> str:
    h = digest.split(":", 1)[1]
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-8{h[17:20]}-{h[20:32]}"


def _registry(ref: str, insecure: bool) -> oras.provider.Registry:
    registry = oras.provider.Registry(hostname=ref.split("/", 1)[0], insecure=insecure)
    registry.session.auth = RegistryTokenAuth()  # also for the raw HEAD/GET calls below
    return registry


def attach(subject_ref: str, document: dict, insecure: bool = True) -> None:
    """Push document as a referrer of subject_ref (REGISTRY/REPO@sha256:...)."""
    repo, digest = subject_ref.split("@", 1)
    reg = _registry(repo, insecure)
    subject_manifest = reg.get_manifest(subject_ref)
    body = json.dumps(subject_manifest, separators=(",", ":")).encode()
    media = subject_manifest.get("mediaType", "application/vnd.oci.image.index.v1+json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sbom.cdx.json"
        path.write_text(json.dumps(document, indent=1, sort_keys=True))
        config = Path(tmp) / "config.json"
        config.write_text("{}")
        subject = oras.oci.Subject(mediaType=media, digest=digest, size=_size(reg, subject_ref, body))
        try:
            reg.push(target=f"{repo}:{digest.replace(':', '-')}.sbom", files=[f"{path}:{MEDIA_TYPE}"],
                     manifest_config=f"{config}:{MEDIA_TYPE}", subject=subject, disable_path_validation=True,
                     quiet=True)
        except Exception as err:  # oras raises bare exceptions for HTTP errors
            raise SbomError(f"attaching the SBOM to {subject_ref}: {err}") from err


def _size(reg: oras.provider.Registry, ref: str, body: bytes) -> int:
    """The subject manifest's size as stored (the registry's Content-Length), falling back to our encoding."""
    repo, digest = ref.split("@", 1)
    host, name = repo.split("/", 1)
    resp = reg.session.head(f"{reg.prefix}://{host}/v2/{name}/manifests/{digest}",
                            headers={"Accept": "application/vnd.oci.image.index.v1+json,"
                                               "application/vnd.oci.image.manifest.v1+json"})
    return int(resp.headers.get("Content-Length") or len(body))


def fetch(subject_ref: str, insecure: bool = True) -> dict | None:
    """The SBOM attached to subject_ref, or None. Found by its tag (`sha256-<hex>.sbom`, the convention cosign
    uses, for registries without the OCI referrers API such as distribution v3), else by the referrers API."""
    repo, digest = subject_ref.split("@", 1)
    reg = _registry(repo, insecure)
    host, name = repo.split("/", 1)
    candidates = [f"{repo}:{digest.replace(':', '-')}.sbom"]
    resp = reg.session.get(f"{reg.prefix}://{host}/v2/{name}/referrers/{digest}", params={"artifactType": MEDIA_TYPE})
    if resp.status_code == 200:
        candidates += [f"{repo}@{d['digest']}" for d in resp.json().get("manifests", [])
                       if d.get("artifactType") == MEDIA_TYPE]
    for ref in candidates:
        try:
            manifest = reg.get_manifest(ref)
        except Exception:  # oras raises bare exceptions for a missing manifest
            continue
        if manifest.get("subject", {}).get("digest") != digest or not manifest.get("layers"):
            continue
        layer = manifest["layers"][0]["digest"]
        return json.loads(reg.get_blob(f"{repo}@{layer}", layer).content)
    return None


def copy(src_ref: str, dest_repo: str, digest: str, insecure: bool) -> None:
    document = fetch(src_ref)
    if document is not None:
        attach(f"{dest_repo}@{digest}", document, insecure=insecure)
