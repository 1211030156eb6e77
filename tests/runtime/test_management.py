"""The management API (model repository extension): off by default, bearer token or loopback port, cache only."""

from __future__ import annotations

import http.client
import json

import pytest
from conftest import free_port, make_cache

TOKEN = "s3cret-" + "z" * 30


def _load(port, digest=None, headers=None, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = body if body is not None else json.dumps({"parameters": {"digest": digest}}).encode()
        c.request("POST", "/v2/repository/models/digits/load", payload, headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read())
    finally:
        c.close()


def _bearer(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def cache(tmp_path, digits, digits_v1):
    root = tmp_path / "cache"
    make_cache(root, *digits_v1, name="other")  # another deployment's model on the same node
    return root, make_cache(root, *digits)


@pytest.fixture
def token_file(tmp_path):
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return p


def test_off_by_default(start_server, cache, digits_v1):
    root, link = cache
    s = start_server(link, None, "--cache", str(root))
    for path in ("/v2/repository/models/digits/load", "/v2/repository/index"):
        status, _, body = s.request("POST", path, json.dumps({"parameters": {"digest": digits_v1[1]}}).encode())
        assert status == 404 and "management API is off" in json.loads(body)["error"]
    assert json.loads(s.request("GET", "/v2/models/digits")[2])["versions"] != [digits_v1[1][7:19]]


def test_token_is_required_and_checked(start_server, cache, token_file, digits, digits_v1):
    root, link = cache
    s = start_server(link, None, "--cache", str(root), "--management-token-file", str(token_file))
    for headers in ({}, _bearer("wrong"), _bearer(TOKEN + "x"), {"Authorization": f"Basic {TOKEN}"}):
        status, _, body = _load(s.port, digits_v1[1], headers)
        assert status == 401 and "Authorization: Bearer" in body["error"], (headers, body)
    status, _, body = _load(s.port, digits_v1[1], _bearer())
    assert status == 200 and body["digest"] == digits_v1[1], body
    assert json.loads(s.request("GET", "/v2/models/digits")[2])["versions"] == [digits_v1[1][7:19]]
    metrics = s.request("GET", "/metrics")[2].decode()
    assert 'edgefleet_runtime_requests_total{code="401",endpoint="repository"} 4.0' in metrics


def test_rotated_token_file_is_read_again(start_server, cache, token_file, digits_v1, tmp_path):
    """A Secret update swaps the mounted file: the new token works at once, the old one no longer does; a
    file that becomes unusable refuses (503 naming the problem) rather than letting anyone in."""
    root, link = cache
    s = start_server(link, None, "--cache", str(root), "--management-token-file", str(token_file))
    assert _load(s.port, digits_v1[1], _bearer())[0] == 200
    new = "rotated-" + "q" * 30
    staged = tmp_path / "token.new"
    staged.write_text(new)
    staged.replace(token_file)  # atomic, as the kubelet swaps a Secret's files
    status, _, body = _load(s.port, digits_v1[1], _bearer())
    assert status == 401 and "Authorization: Bearer" in body["error"], body
    assert _load(s.port, digits_v1[1], _bearer(new))[0] == 200
    token_file.write_text("short")
    status, _, body = _load(s.port, digits_v1[1], _bearer(new))
    assert status == 503 and "at least 16 characters" in body["error"] and str(token_file) in body["error"], body
    token_file.write_text(new + "\n")
    assert _load(s.port, digits_v1[1], _bearer(new))[0] == 200


def test_load_takes_only_a_cached_digest(start_server, cache, token_file, digits, tmp_path):
    root, link = cache
    s = start_server(link, None, "--cache", str(root), "--management-token-file", str(token_file))
    # a caller's path is never used, even one inside the cache
    body = json.dumps({"parameters": {"digest": digits[1], "path": str(root / "sha256" / digits[1][7:])}}).encode()
    status, _, out = _load(s.port, headers=_bearer(), body=body)
    assert status == 400 and "parameters.path is not accepted" in out["error"]
    # a digest that is not in the cache
    status, _, out = _load(s.port, "sha256:" + "0" * 64, _bearer())
    assert status == 404 and "not in the node cache" in out["error"]
    # a cache file whose bytes do not match its name: refused without revealing the file's digest
    outside = tmp_path / "secret.onnx"
    outside.write_bytes(b"not a model, but its digest must not leak")
    from models import sha256

    wrong = "sha256:" + "c" * 64
    (root / "sha256" / ("c" * 64)).write_bytes(outside.read_bytes())
    status, _, out = _load(s.port, wrong, _bearer())
    assert status == 409 and sha256(outside)[7:] not in out["error"], out
    for bad in ("sha256:../../etc/passwd", "md5:abc", 42):
        status, _, out = _load(s.port, bad, _bearer())
        assert status == 400 and "parameters.digest" in out["error"], out


def test_loopback_management_port(start_server, cache, digits, digits_v1):
    root, link = cache
    mport = free_port()
    s = start_server(link, None, "--cache", str(root), "--management-port", str(mport))
    # not on the serving port ...
    status, _, body = _load(s.port, digits_v1[1])
    assert status == 404 and "management API is off" in body["error"]
    # ... but on the management port, which serves nothing else
    status, _, body = _load(mport, digits_v1[1])
    assert status == 200 and body["digest"] == digits_v1[1], body
    c = http.client.HTTPConnection("127.0.0.1", mport, timeout=5)
    c.request("GET", "/v2/health/ready")
    assert c.getresponse().status == 404
    c.close()


def test_management_port_listens_on_loopback_only(start_server, cache):
    import socket

    root, link = cache
    mport = free_port()
    start_server(link, None, "--cache", str(root), "--management-port", str(mport))
    addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    addrs |= {"127.0.0.2"}  # another loopback address: still not the bound one
    for addr in addrs:
        with pytest.raises(OSError):
            socket.create_connection((addr, mport), timeout=2).close()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--management-token-file", "/nonexistent/token"], "--management-token-file /nonexistent/token"),
        (["--management-token-file", "SHORT"], "at least 16 characters"),
        (["--management-port", "0", "--no-cache"], "needs --cache"),
    ],
)
def test_bad_management_settings_exit_with_usage(start_server, cache, tmp_path, args, needle):
    root, link = cache
    short = tmp_path / "short"
    short.write_text("abc")
    args = [str(short) if a == "SHORT" else a for a in args]
    extra = [] if "--no-cache" in args else ["--cache", str(root)]
    args = [a for a in args if a != "--no-cache"]
    s = start_server(link, None, *extra, *args, wait=False)
    assert s.proc.wait(20) == 2
    assert needle in s.logs()
