from __future__ import annotations

import hashlib

import pytest
from edgefleet.artifacts import ArtifactStore, DigestError, LocalStore, OCIStore, open_store


def test_local_store_round_trip_and_verify(tmp_path):
    s = LocalStore(tmp_path)
    assert isinstance(s, ArtifactStore)
    ref = s.put(b"model-bytes", name="m", media_type="application/x", annotations={"a": "1"})
    hexd = hashlib.sha256(b"model-bytes").hexdigest()
    assert ref.digest == f"sha256:{hexd}" and ref.sizeBytes == 11
    assert s.get(ref.ref, ref.digest) == b"model-bytes"
    assert s.metadata(ref.digest)["annotations"] == {"a": "1"}
    assert s.put(b"model-bytes", name="m", media_type="application/x").ref == ref.ref  # content-addressed
    (tmp_path / "sha256" / hexd).write_bytes(b"tampered")
    with pytest.raises(DigestError):
        s.get(ref.ref, ref.digest)
    assert not [p for p in (tmp_path / "sha256").iterdir() if p.name.startswith(".tmp")]


def test_open_store(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    s = open_store("oci://127.0.0.1:5000/edgefleet/models")
    assert isinstance(s, OCIStore) and s.registry == "127.0.0.1:5000" and s.repository == "edgefleet/models"
