"""Content-addressed artifact stores for compiled model variants.

Public API::

    class ArtifactStore(Protocol):
        def put(self, data: bytes, *, name: str, media_type: str,
                annotations: dict[str, str] | None = None, filename: str = "model") -> ArtifactRef
        def get(self, ref: str, digest: str) -> bytes        # verifies sha256, raises DigestError

    LocalStore(root: Path)                                  # root/sha256/<hex> (+ <hex>.json metadata)
    OCIStore(registry: str, repository: str = "edgefleet/models", insecure: bool = True)
    open_store(spec: str) -> ArtifactStore                  # "oci://host:port/repo" or a directory
    own_store(spec, ref, insecure, username, password)      # the operator's store, its credentials: spec's host only
    pod_store(spec)                                         # the store the operator named for a Job pod, its token
    ArtifactRef(ref: str, digest: str, sizeBytes: int, mediaType: str)
    publish_delta(store, name=, base_ref=, base_digest=, target_ref=, target_digest=) -> PublishedDelta | None

``digest`` is always ``sha256:<hex>`` of the model bytes (the OCI layer), so a node verifies the
bytes it serves whatever store they came from. The OCI store pushes one manifest per variant with the
compile report as manifest annotations (``io.edgefleet.*``) and refers to it by manifest digest.
No Kubernetes imports here.
"""

from .deltas import PublishedDelta, publish_delta
from .store import (
    ArtifactRef,
    ArtifactStore,
    DigestError,
    LocalStore,
    OCIStore,
    StoreError,
    open_store,
    own_store,
    parse_digest,
    pod_store,
)

__all__ = [
    "ArtifactRef", "ArtifactStore", "DigestError", "LocalStore", "OCIStore", "PublishedDelta", "StoreError",
    "open_store", "own_store", "pod_store", "parse_digest", "publish_delta",
]
