"""Content digests and the node-local content-addressed cache layout.

Cache layout (shared by ``fetch`` and ``serve``)::

    DIR/sha256/<64 hex>        the artifact bytes, read-only, named by their sha256
    DIR/sha256/<64 hex>.sig    its signature, when the variant is signed (trust.py)
    DIR/current/<name>         symlink -> ../sha256/<64 hex>, the variant this node should serve
    DIR/tmp/                   partial downloads (same filesystem, so rename is atomic)
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class DigestError(ValueError):
    """The bytes do not match the expected digest, or a digest string is malformed."""


def parse_digest(digest: str) -> str:
    """Return the 64-hex part of ``sha256:<hex>``; raise DigestError naming the problem."""
    m = _DIGEST.match(digest.strip().lower()) if isinstance(digest, str) else None
    if not m:
        raise DigestError(f"digest {digest!r} is not of the form sha256:<64 lowercase hex>")
    return m.group(1)


def file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def verify_file(path: str | os.PathLike[str], expected: str) -> str:
    """Hash ``path`` and compare with ``expected``; return the digest or raise DigestError."""
    want = "sha256:" + parse_digest(expected)
    got = file_digest(path)
    if got != want:
        raise DigestError(f"digest mismatch for {os.fspath(path)}: expected {want}, file has {got}")
    return got


def digest_from_cache_path(path: str | os.PathLike[str]) -> str | None:
    """``…/sha256/<hex>`` (after resolving symlinks) -> ``sha256:<hex>``; anything else -> None."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "sha256" and _HEX.match(real.name):
        return "sha256:" + real.name
    return None


def blob_path(cache: str | os.PathLike[str], digest: str) -> Path:
    return Path(cache) / "sha256" / parse_digest(digest)


def current_path(cache: str | os.PathLike[str], name: str) -> Path:
    return Path(cache) / "current" / name
