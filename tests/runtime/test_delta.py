"""Delta downloads: a federated head update of the quickstart's model published as a delta by the operator's
artifact store and fetched by the runtime, over real HTTP on loopback (bytes counted on the wire)."""

from __future__ import annotations

import bz2
import hashlib
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import models
import pytest
from edgefleet.artifacts import LocalStore, publish_delta
from edgefleet_runtime import delta, trust
from edgefleet_runtime.fetch import DeltaSource, fetch


def _need_delta_libraries():
    missing = {"bsdiff", "zstd"} - set(delta.available())
    if missing:
        pytest.fail(f"the delta methods {sorted(missing)} are not installed: pip install zstandard bsdiff4 "
                    "(the runtime's `delta` extra)")


class _Files(BaseHTTPRequestHandler):
    """Serves a directory; counts the body bytes it sends; ``tamper`` replaces a path's bytes, ``stall`` makes
    a path answer one byte a second."""

    root: Path
    sent = 0
    tamper: dict[str, bytes] = {}
    stall: set[str] = set()

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = self.root / self.path.lstrip("/")
        body = self.tamper.get(self.path)
        if body is None:
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.stall:
            try:
                for i in range(min(len(body), 30)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:  # the client gave up: what this test wants
                pass
            return
        self.wfile.write(body)
        type(self).sent += len(body)


@pytest.fixture
def published(tmp_path):
    """(store root, http base url, base ArtifactRef, target ArtifactRef, PublishedDelta) with the store served
    over loopback HTTP."""
    _need_delta_libraries()
    base, updated = models.head_update(tmp_path / "models")
    store = LocalStore(tmp_path / "store")
    a = store.put(base.read_bytes(), name="digits", media_type="application/vnd.onnx.model")
    b = store.put(updated.read_bytes(), name="digits", media_type="application/vnd.onnx.model")
    published = publish_delta(store, name="digits", base_ref=a.ref, base_digest=a.digest, target_ref=b.ref,
                              target_digest=b.digest)
    assert published is not None
    _Files.root, _Files.sent, _Files.tamper, _Files.stall = store.root, 0, {}, set()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield store, url, a, b, published
    srv.shutdown()


def _http(url: str, digest: str) -> str:
    return f"{url}/sha256/{digest.split(':')[1]}"


def _source(url, published) -> DeltaSource:
    return DeltaSource(published.base, _http(url, published.digest), published.digest, published.sizeBytes)


def _cache_with_base(tmp_path, url, base) -> Path:
    cache = tmp_path / "cache"
    fetch(_http(url, base.digest), base.digest, cache)
    return cache


def test_delta_head_update_fetches_under_a_tenth_of_the_full_variant(tmp_path, published):
    store, url, base, target, pub = published
    cache = _cache_with_base(tmp_path, url, base)
    _Files.sent, stats = 0, {}
    path = fetch(_http(url, target.digest), target.digest, cache, name="digits", deltas=[_source(url, pub)],
                 stats=stats)
    delta_bytes = _Files.sent
    full_cache, _Files.sent = tmp_path / "full", 0
    full_path = fetch(_http(url, target.digest), target.digest, full_cache)
    full_bytes = _Files.sent
    print(f"\nhead update: delta {delta_bytes} B ({pub.method}), full {full_bytes} B, "
          f"ratio {delta_bytes / full_bytes:.3f}")
    assert stats["method"] == "delta", stats
    assert stats["bytes"] == delta_bytes == pub.sizeBytes
    assert full_bytes == target.sizeBytes
    assert delta_bytes <= 0.10 * full_bytes
    assert path.read_bytes() == full_path.read_bytes() == store.get(target.ref, target.digest)
    assert (cache / "current" / "digits").resolve() == path.resolve()
    assert oct(path.stat().st_mode & 0o777) == "0o444"


@pytest.mark.parametrize("method", ["bsdiff", "zstd"])
def test_delta_each_method_gives_the_target_byte_for_byte(tmp_path, method):
    _need_delta_libraries()
    base, updated = (p.read_bytes() for p in models.head_update(tmp_path))
    d = delta.make(base, updated, method)
    assert delta.header(d) == (method, "sha256:" + hashlib.sha256(base).hexdigest(),
                               "sha256:" + hashlib.sha256(updated).hexdigest(), len(updated))
    assert delta.apply(base, d, len(updated)) == updated
    with pytest.raises(delta.DeltaError, match="not against the base"):
        delta.apply(updated, d, len(updated))
    with pytest.raises(delta.DeltaError, match="over the limit"):
        delta.apply(base, d, len(updated) - 1)


def test_delta_corrupt_bytes_fall_back_to_the_full_variant(tmp_path, published):
    store, url, base, target, pub = published
    cache = _cache_with_base(tmp_path, url, base)
    good = (store.root / "sha256" / pub.digest.split(":")[1]).read_bytes()
    _Files.tamper = {f"/sha256/{pub.digest.split(':')[1]}": good[:-100] + bytes(100)}
    stats: dict = {}
    path = fetch(_http(url, target.digest), target.digest, cache, deltas=[_source(url, pub)], stats=stats)
    assert stats["method"] == "full" and "does not have its digest" in stats["delta_error"]
    assert path.read_bytes() == store.get(target.ref, target.digest)


@pytest.mark.parametrize("forgery", ["other-target", "lying-header", "garbage-payload"])
def test_delta_forged_with_a_matching_digest_never_yields_wrong_bytes(tmp_path, published, forgery):
    """The attacker controls the delta and its declared digest: the result's digest still decides."""
    store, url, base, target, pub = published
    cache = _cache_with_base(tmp_path, url, base)
    base_bytes, target_bytes = store.get(base.ref, base.digest), store.get(target.ref, target.digest)
    evil = bytearray(target_bytes)
    evil[-5000:] = bytes(5000)
    if forgery == "other-target":  # a genuine delta to other bytes: names another target
        forged = delta.make(base_bytes, bytes(evil), "zstd")
    elif forgery == "lying-header":  # names our target, gives other bytes
        real = delta.make(base_bytes, bytes(evil), "bsdiff")
        forged = delta.HEADER.pack(delta.MAGIC, 1, hashlib.sha256(base_bytes).digest(),
                                   hashlib.sha256(target_bytes).digest(), len(target_bytes)) + real[delta.HEADER.size:]
    else:
        forged = delta.make(base_bytes, target_bytes, "zstd")[:delta.HEADER.size] + b"\x28\xb5\x2f\xfd" + bytes(64)
    forged_ref = LocalStore(tmp_path / "evil").put(forged, name="evil", media_type=delta.MEDIA_TYPE)
    source = DeltaSource(base.digest, forged_ref.ref, forged_ref.digest)
    stats: dict = {}
    path = fetch(_http(url, target.digest), target.digest, cache, deltas=[source], stats=stats)
    assert stats["method"] == "full" and stats["delta_error"]
    assert path.read_bytes() == target_bytes
    assert sorted(p.name for p in (cache / "tmp").iterdir()) == []


def _bsdiff_delta(base: bytes, size: int, control: list[tuple[int, int, int]], diff: bytes, extra: bytes,
                  target_digest: bytes) -> bytes:
    def i64(v: int) -> bytes:
        return (abs(v) | (1 << 63 if v < 0 else 0)).to_bytes(8, "little")

    c = bz2.compress(b"".join(i64(x) + i64(y) + i64(z) for x, y, z in control))
    d, e = bz2.compress(diff), bz2.compress(extra)
    patch = b"BSDIFF40" + i64(len(c)) + i64(len(d)) + i64(size) + c + d + e
    return delta.HEADER.pack(delta.MAGIC, 1, hashlib.sha256(base).digest(), target_digest, size) + patch


@pytest.mark.parametrize("case", ["extra-past-target", "negative-length", "short-cover", "bz2-bomb"])
def test_delta_hostile_bsdiff_controls_are_refused_before_the_c_code(case):
    """bsdiff4's C patcher bounds only the diff copy; a control tuple whose extra copy runs past the target would
    write past its buffer. delta.apply checks every tuple first."""
    _need_delta_libraries()
    base, size, want = b"b" * 1000, 100, hashlib.sha256(b"x").digest()
    cases = {
        "extra-past-target": ([(10, 95, 0)], bytes(10), b"\xff" * 95),
        "negative-length": ([(-10, 20, 0)], b"", b"\xff" * 20),
        "short-cover": ([(10, 10, 0)], bytes(10), bytes(10)),
        "bz2-bomb": ([(size, 0, 0)], bytes(50 << 20), b""),
    }
    control, diff, extra = cases[case]
    with pytest.raises(delta.DeltaError, match="unpacks to more" if case == "bz2-bomb" else "control block"):
        delta.apply(base, _bsdiff_delta(base, size, control, diff, extra, want), 1 << 20)


def test_delta_zstd_frame_claiming_a_huge_size_is_bounded():
    _need_delta_libraries()
    import zstandard

    base = b"base" * 1000
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # 64 MiB of zeros in a few KiB
    forged = delta.HEADER.pack(delta.MAGIC, 2, hashlib.sha256(base).digest(), bytes(32), 1000) + bomb
    with pytest.raises(delta.DeltaError):
        delta.apply(base, forged, 1 << 20)
    assert len(bomb) < 1 << 20
    header = struct.unpack(">8sB32s32sQ", forged[:delta.HEADER.size])
    assert header[4] == 1000


def test_delta_signed_variant_is_checked_on_the_delta_path(tmp_path, published):
    store, url, base, target, pub = published
    private_pem, public = trust.generate_signing_key()
    key_file = tmp_path / "key.pub"
    key_file.write_bytes(public)
    signer = trust.load_signing_key(_write(tmp_path / "key.pem", private_pem))
    for d in (base.digest, target.digest):
        (store.root / "sha256" / (d.split(":")[1] + ".sig")).write_text(trust.sign_digest(signer, d))
    policy = trust.Policy.from_files([key_file], require_signature=True)
    cache = tmp_path / "cache"
    fetch(_http(url, base.digest), base.digest, cache, policy=policy)
    stats: dict = {}
    path = fetch(_http(url, target.digest), target.digest, cache, policy=policy, deltas=[_source(url, pub)],
                 stats=stats)
    assert stats["method"] == "delta"
    kept = trust.read_signature_file(trust.signature_path(path))
    assert kept == (store.root / "sha256" / (target.digest.split(":")[1] + ".sig")).read_text().strip()
    assert policy.check(target.digest, kept, "kept") is not None
    # a forged signature: neither the delta nor the full download may install the variant
    other, _ = trust.generate_signing_key()
    (store.root / "sha256" / (target.digest.split(":")[1] + ".sig")).write_text(
        trust.sign_digest(trust.load_signing_key(_write(tmp_path / "other.pem", other)), target.digest))
    cache2 = tmp_path / "cache2"
    fetch(_http(url, base.digest), base.digest, cache2, policy=trust.Policy.from_files([key_file]))
    with pytest.raises(trust.TrustError):
        fetch(_http(url, target.digest), target.digest, cache2, policy=policy, deltas=[_source(url, pub)])
    assert not (cache2 / "sha256" / target.digest.split(":")[1]).exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_delta_stalled_download_falls_back_within_its_deadline(tmp_path, published, monkeypatch):
    store, url, base, target, pub = published
    cache = _cache_with_base(tmp_path, url, base)
    monkeypatch.setattr("edgefleet_runtime.fetch.DELTA_DEADLINE_SECONDS", 2.0)
    _Files.stall = {f"/sha256/{pub.digest.split(':')[1]}"}
    stats: dict = {}
    t0 = time.monotonic()
    path = fetch(_http(url, target.digest), target.digest, cache, deltas=[_source(url, pub)], stats=stats)
    assert time.monotonic() - t0 < 10
    assert stats["method"] == "full" and "deadline" in stats["delta_error"]
    assert path.read_bytes() == store.get(target.ref, target.digest)


def test_delta_without_the_base_in_cache_downloads_the_full_variant(tmp_path, published):
    store, url, base, target, pub = published
    stats: dict = {}
    fetch(_http(url, target.digest), target.digest, tmp_path / "empty", deltas=[_source(url, pub)], stats=stats)
    assert stats == {"method": "full", "bytes": target.sizeBytes}


def test_delta_flag_parses_and_names_what_is_wrong():
    d = "sha256:" + "a" * 64
    src = DeltaSource.parse(f"base={d},digest={d},sizeBytes=12,ref=https://h/x?a=1,b=2")
    assert src == DeltaSource(d, "https://h/x?a=1,b=2", d, 12)
    with pytest.raises(ValueError, match="missing \\['digest'\\]"):
        DeltaSource.parse(f"base={d},ref=file:///x")
    with pytest.raises(ValueError, match="sha256"):
        DeltaSource.parse(f"base=md5:1,digest={d},ref=file:///x")


def test_delta_publisher_skips_a_delta_larger_than_half_the_variant(tmp_path):
    _need_delta_libraries()
    store = LocalStore(tmp_path / "store")
    rnd = __import__("os").urandom
    a = store.put(rnd(50_000), name="m", media_type="application/octet-stream")
    b = store.put(rnd(50_000), name="m", media_type="application/octet-stream")
    assert publish_delta(store, name="m", base_ref=a.ref, base_digest=a.digest, target_ref=b.ref,
                         target_digest=b.digest) is None
    assert sorted(store.digests()) == sorted([a.digest, b.digest])
