"""Publish a variant also as a delta against a variant nodes already hold (edgefleet_runtime.delta).

The delta is one more artifact in the same store (media type ``application/vnd.edgefleet.delta.v1``),
annotated with its base and target digests and its method. It carries no signature of its own: the node
verifies what it builds from it by the target's digest and signature, exactly as a full download.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet_runtime import delta

from .store import ArtifactStore, StoreError

MAX_RATIO = 0.5  # a delta larger than half the variant is not published: the full download is as good


@dataclass(frozen=True)
class PublishedDelta:
    base: str  # digest of the variant the delta applies to
    target: str  # digest of the variant it gives
    ref: str  # where the delta is
    digest: str  # sha256 of the delta's bytes
    sizeBytes: int
    method: str  # "bsdiff" or "zstd"

    def flag(self) -> str:
        """The runtime's ``fetch --delta`` value."""
        return f"base={self.base},digest={self.digest},sizeBytes={self.sizeBytes},ref={self.ref}"


def publish_delta(store: ArtifactStore, *, name: str, base_ref: str, base_digest: str, target_ref: str,
                  target_digest: str, max_ratio: float = MAX_RATIO,
                  methods: list[str] | None = None) -> PublishedDelta | None:
    """Make the smallest delta from the base to the target (both read back from ``store`` and verified) and
    push it; None when it would be larger than ``max_ratio`` of the target. StoreError when a variant
    cannot be read or no delta method is installed."""
    if not (methods or delta.available()):  # before reading two variants for nothing
        raise StoreError(f"cannot make a delta {base_digest} -> {target_digest}: no delta method is available: "
                         "install the delta extra (zstandard, bsdiff4) in the operator's image")
    base = store.get(base_ref, base_digest)
    target = store.get(target_ref, target_digest)
    try:
        method, data = delta.make_smallest(base, target, methods)
    except delta.DeltaError as e:
        raise StoreError(f"cannot make a delta {base_digest} -> {target_digest}: {e}") from e
    if len(data) > max_ratio * len(target):
        return None
    ref = store.put(data, name=f"{name}-delta", media_type=delta.MEDIA_TYPE, filename="delta", annotations={
        "io.edgefleet.delta.base": base_digest, "io.edgefleet.delta.target": target_digest,
        "io.edgefleet.delta.method": method})
    return PublishedDelta(base_digest, target_digest, ref.ref, ref.digest, ref.sizeBytes, method)
