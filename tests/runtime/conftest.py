"""Fixtures for the runtime tests: real model files and the real server started as a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402

REPO_FIXTURES = models.REPO / "tests" / "fixtures" / "models"


def free_port() -> int:
    """A free port below the ephemeral range (a port 0 bind hands out one that any client connection's source
    port may take before the server binds it: "Address already in use" under load)."""
    from edgefleet_dev.net import free_port as below_ephemeral

    return below_ephemeral()


class Server:
    """``edgefleet-runtime serve`` in a subprocess, with its JSON logs in ``log_path``."""

    def __init__(self, model: Path, digest: str | None, *extra: str, name: str = "digits", tmp: Path):
        self.port = free_port()
        self.name = name
        self.log_path = tmp / f"server-{self.port}.log"
        args = [
            sys.executable,
            "-m",
            "edgefleet_runtime.cli",
            "serve",
            "--model",
            str(model),
            "--name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            "1",
            *extra,
        ]
        if digest:
            args += ["--digest", digest]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(self, method, path, body=None, headers=None):
        c = self.conn()
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def infer_json(self, payload: dict, name: str | None = None):
        status, headers, body = self.request(
            "POST",
            f"/v2/models/{name or self.name}/infer",
            json.dumps(payload).encode(),
            {"Content-Type": "application/json"},
        )
        return status, json.loads(body) if body else None

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def digits(model_dir) -> tuple[Path, str]:
    p = models.digits_onnx(model_dir, 0)
    return p, models.sha256(p)


@pytest.fixture(scope="session")
def digits_v1(model_dir) -> tuple[Path, str]:
    p = models.digits_onnx(model_dir, 1)
    return p, models.sha256(p)


@pytest.fixture
def start_server(tmp_path):
    started: list[Server] = []

    def start(model, digest, *extra, name="digits", wait=True) -> Server:
        s = Server(model, digest, *extra, name=name, tmp=tmp_path)
        started.append(s)
        return s.wait_ready() if wait else s

    yield start
    for s in started:
        s.stop(signal.SIGKILL) if s.proc.poll() is None else s.stop()


@pytest.fixture(scope="session")
def server(digits, tmp_path_factory):
    """One shared server for the read-only tests; 1 MiB body limit."""
    path, digest = digits
    s = Server(path, digest, "--max-body-bytes", str(1 << 20), tmp=tmp_path_factory.mktemp("srv")).wait_ready()
    yield s
    assert s.stop() == 0, s.logs()


def make_cache(root: Path, model: Path, digest: str, name: str = "digits") -> Path:
    """Lay a model out as the node cache does: root/sha256/<hex> and root/current/<name>."""
    blob = root / "sha256" / digest.split(":", 1)[1]
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.write_bytes(model.read_bytes())
    link = root / "current" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{name}.tmp")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(os.path.join("..", "sha256", blob.name), tmp)
    os.replace(tmp, link)
    return link
