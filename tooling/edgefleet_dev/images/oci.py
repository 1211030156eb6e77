"""Layers, manifests and pushes: reproducible tar layers (GNU tar's reproducible-build flags) assembled and
pushed by crane; a distribution registry on loopback holds what was built (the image cache)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from .. import toolchain as components
from ..net import free_port

TAR_FLAGS = ["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--format=posix",
             "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime", "--mode=a+rX"]


class PushError(RuntimeError):
    """A registry refused or could not be reached; the message names the image and the registry."""


def tar_layer(root: Path, out: Path) -> int:
    """A layer tar of root's contents, byte-identical for identical contents; returns its size (unpacked)."""
    tmp = out.with_suffix(".partial")
    entries = sorted(p.name for p in root.iterdir())
    subprocess.run(["tar", *TAR_FLAGS, "-C", str(root), "-cf", str(tmp), "--", *entries], check=True)
    tmp.rename(out)
    return out.stat().st_size


def gzip_layer(tar: Path, out: Path) -> None:
    """Compress a layer once (gzip -n: no name or time in the header, so the bytes are reproducible)."""
    tmp = out.with_suffix(".partial")
    with tmp.open("wb") as fh:
        subprocess.run(["gzip", "-n", "-6", "-c", str(tar)], stdout=fh, check=True)
    tmp.rename(out)
    tar.unlink()


def exists(ref: str) -> bool:
    binary = components.binary_path("crane")
    return subprocess.run([str(binary), "manifest", "--insecure", ref], capture_output=True).returncode == 0


def crane(*args: str, insecure: bool = True) -> str:
    binary = components.binary_path("crane")
    if not binary.exists():
        components.build_all(names=["crane", "pause", "registry"])
    cmd = [str(binary), *args, *(["--insecure"] if insecure else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PushError(f"crane {args[0]} {args[1] if len(args) > 1 else ''}: {proc.stderr.strip()[-800:]}")
    return proc.stdout.strip()


@contextlib.contextmanager
def local_registry(storage: Path, readonly: bool = False) -> Iterator[str]:
    """The image cache: a registry on a free loopback port over `storage`, stopped on exit."""
    binary = components.binary_path("registry")
    if not binary.exists():
        components.build_all(names=["crane", "pause", "registry"])
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = storage.parent / "registry.yaml"
    config.write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True},
                    "maintenance": {"readonly": {"enabled": readonly}, "uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    log = (storage.parent / "registry.log").open("ab")
    proc = subprocess.Popen([str(binary), "serve", str(config)], stdout=log, stderr=log,
                            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v2/", proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PushError(f"the image cache registry exited ({proc.returncode}); see its registry.log")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1):
                return
        time.sleep(0.1)
    raise PushError("the image cache registry did not answer within 20 s")


def manifest(ref: str) -> dict:
    return json.loads(crane("manifest", ref))


def digest(ref: str) -> str:
    return crane("digest", ref)
