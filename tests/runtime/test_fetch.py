"""``edgefleet-runtime fetch``: content-addressed cache, digest check, offline reuse, OCI over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from edgefleet_runtime.digest import DigestError
from edgefleet_runtime.fetch import fetch


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "edgefleet_runtime.cli", "fetch", *args], capture_output=True, text=True, timeout=60
    )


def test_fetch_file_into_cache_and_point_current(tmp_path, digits):
    path, digest = digits
    cache = tmp_path / "cache"
    r = _cli("--ref", path.as_uri(), "--digest", digest, "--cache", str(cache), "--name", "digits")
    assert r.returncode == 0, r.stderr
    blob = cache / "sha256" / digest.split(":")[1]
    assert r.stdout.strip() == str(blob)
    assert blob.read_bytes() == path.read_bytes()
    assert oct(blob.stat().st_mode & 0o777) == "0o444"
    link = cache / "current" / "digits"
    assert os.readlink(link) == os.path.join("..", "sha256", blob.name)
    assert link.resolve() == blob.resolve()
    assert list((cache / "tmp").iterdir()) == []


def test_fetch_is_a_no_op_when_cached_even_offline(tmp_path, digits):
    path, digest = digits
    cache = tmp_path / "cache"
    fetch(path.as_uri(), digest, cache)
    # the source is gone (offline node): the cached blob still satisfies the fetch
    r = _cli("--ref", "oci://127.0.0.1:1/gone@" + digest, "--digest", digest, "--cache", str(cache), "--name", "digits")
    assert r.returncode == 0, r.stderr
    assert "already cached" in r.stderr


def test_fetch_digest_mismatch_leaves_nothing(tmp_path, digits, digits_v1):
    cache = tmp_path / "cache"
    r = _cli("--ref", digits[0].as_uri(), "--digest", digits_v1[1], "--cache", str(cache))
    assert r.returncode == 3
    assert "digest mismatch" in r.stderr
    assert not (cache / "sha256").exists() or list((cache / "sha256").iterdir()) == []
    assert list((cache / "tmp").iterdir()) == []


def test_fetch_replaces_a_corrupt_cached_blob(tmp_path, digits):
    path, digest = digits
    cache = tmp_path / "cache"
    blob = cache / "sha256" / digest.split(":")[1]
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"bitrot")
    assert fetch(path.as_uri(), digest, cache) == blob
    assert blob.read_bytes() == path.read_bytes()


class _Registry(BaseHTTPRequestHandler):
    """Just enough of the OCI distribution API for a pull: manifests and blobs by digest."""

    blobs: dict[str, bytes] = {}
    manifests: dict[str, bytes] = {}

    def log_message(self, *a):
        pass

    def _send(self, code, body=b"", ctype="application/octet-stream", head=False):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if code == 200 and "manifests" in self.path:
            self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(body).hexdigest())
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self, head=False):
        parts = self.path.split("/")
        if self.path in ("/v2/", "/v2"):
            return self._send(200, b"{}", "application/json", head)
        if len(parts) >= 5 and parts[-2] == "manifests":
            ref = parts[-1]
            body = self.manifests.get(ref)
            if body is None:
                return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', "application/json", head)
            return self._send(200, body, "application/vnd.oci.image.manifest.v1+json", head)
        if len(parts) >= 5 and parts[-2] == "blobs" and parts[-1] in self.blobs:
            return self._send(200, self.blobs[parts[-1]], head=head)
        return self._send(404, b"{}", "application/json", head)

    def do_HEAD(self):
        self.do_GET(head=True)


@pytest.fixture
def registry(digits):
    data = digits[0].read_bytes()
    config = b"{}"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.edgefleet.model.v1",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "size": 2,
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.onnx.model",
                    "size": len(data),
                    "digest": digits[1],
                    "annotations": {"org.opencontainers.image.title": "model.onnx"},
                }
            ],
        }
    ).encode()
    mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    _Registry.blobs = {digits[1]: data}
    _Registry.manifests = {mdigest: manifest, "v1": manifest}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.server_address[1]}", mdigest
    srv.shutdown()


@pytest.mark.parametrize("form", ["manifest-digest", "tag", "blob-digest"])
def test_fetch_from_oci_registry_over_loopback(tmp_path, digits, registry, form):
    host, mdigest = registry
    ref = {
        "manifest-digest": f"oci://{host}/models/digits@{mdigest}",
        "tag": f"oci://{host}/models/digits:v1",
        "blob-digest": f"oci://{host}/models/digits@{digits[1]}",
    }[form]
    cache = tmp_path / "cache"
    r = _cli("--ref", ref, "--digest", digits[1], "--cache", str(cache), "--name", "digits")
    assert r.returncode == 0, r.stderr
    assert (cache / "current" / "digits").read_bytes() == digits[0].read_bytes()


def test_fetch_from_oci_with_the_wrong_digest_is_refused(tmp_path, digits_v1, registry):
    host, mdigest = registry
    with pytest.raises(DigestError, match="digest mismatch"):
        fetch(f"oci://{host}/models/digits@{mdigest}", digits_v1[1], tmp_path / "cache")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the with block ends: connections are refused


def test_fetch_from_an_unreachable_registry_gives_up_after_bounded_logged_retries(tmp_path, digits):
    """The init container must fail in seconds, say why in its log on every attempt and in its termination
    message, and exit with the code the operator reads as "registry unreachable" (not retry silently for
    minutes as ORAS does)."""
    from edgefleet_runtime.exitcodes import EXIT_UNREACHABLE

    port = _closed_port()
    termination = tmp_path / "termination-log"
    termination.write_text("")
    env = {**os.environ, "EDGEFLEET_FETCH_ATTEMPTS": "3", "EDGEFLEET_TERMINATION_LOG": str(termination)}
    r = subprocess.run([sys.executable, "-m", "edgefleet_runtime.cli", "fetch", f"--ref=oci://127.0.0.1:{port}/m/d:1",
                        f"--digest={digits[1]}", f"--cache={tmp_path / 'cache'}"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == EXIT_UNREACHABLE, r.stderr
    retries = [json.loads(line) for line in r.stderr.splitlines() if "registry unreachable, retrying" in line]
    assert [(e["attempt"], e["attempts"]) for e in retries] == [(1, 3), (2, 3)], r.stderr  # then the failure
    assert retries[0]["error"] == "ConnectionError: [Errno 111] Connection refused", retries[0]
    message = termination.read_text()
    assert message.startswith(f"registry 127.0.0.1:{port} unreachable: 3 attempts"), message
    assert "Connection refused" in message, message


def test_registry_retries_stop_at_the_first_answer_and_5xx_counts_as_unreachable():
    from edgefleet_runtime.fetch import RegistryUnreachable, with_retries

    class Resp:
        def __init__(self, status):
            self.status_code = status

    answers = iter([Resp(503), Resp(502), Resp(404)])
    slept: list[float] = []
    assert with_retries(lambda: next(answers), "r:1", attempts=5, sleep=slept.append).status_code == 404
    assert len(slept) == 2 and 0.5 <= slept[0] <= 1.0 and 1.0 <= slept[1] <= 2.0, slept
    with pytest.raises(RegistryUnreachable, match=r"registry r:1 unreachable: 2 attempts .* last: HTTP 504"):
        with_retries(lambda: Resp(504), "r:1", attempts=2, sleep=slept.append)
