"""Skip no-op applies: each child carries a hash of what we rendered for it, and a child whose hash
matches what we would send now is not sent again.

The hash covers the whole rendered object (labels, annotations, owner references, spec), not what the
API server stores (defaults, status, managedFields), so it is stable across reads. A change someone
else makes to a child's spec is not undone until our rendering changes (or the child is deleted).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..kube import Kube

SPEC_HASH = "edgefleet.io/applied-hash"


def applied_hash(obj: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the rendered object, without the hash annotation itself."""
    meta = dict(obj.get("metadata") or {})
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if k != SPEC_HASH}
    meta["annotations"] = notes
    body = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    text = json.dumps({"metadata": meta, **body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its hash annotation."""
    meta = obj["metadata"]
    notes = {**(meta.get("annotations") or {}), SPEC_HASH: applied_hash(obj)}
    return {**obj, "metadata": {**meta, "annotations": notes}}


def unchanged(obj: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """Whether `live` is what applying `obj` would leave (its hash annotation matches)."""
    if live is None or live.get("metadata", {}).get("deletionTimestamp"):
        return False
    return (live["metadata"].get("annotations") or {}).get(SPEC_HASH) == applied_hash(obj)


def apply_changed(kube: Kube, obj: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    """Server-side apply `obj` (stamped with its hash) unless `live` already carries that hash; the live object."""
    if live is not None and unchanged(obj, live):
        return live
    return kube.apply(stamped(obj))
