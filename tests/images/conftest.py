"""Images built once per test session (cached: seconds when warm) and a way to reach them."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

DEFAULT = ["pause", "runtime-cpu", "runtime-openvino", "runtime-coral", "operator", "compiler"]


def can_build() -> str | None:
    """Why images cannot be built on this host, or None."""
    for tool in ("go", "apt-get", "dpkg-deb", "tar"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (images are built from Debian packages and Go tools)"
    return None


@pytest.fixture(scope="session")
def built() -> dict:
    """Every default image, built (or taken from the cache) for this host's platform and arm64."""
    reason = can_build()
    if reason:
        pytest.skip(reason)
    from edgefleet_dev.images import build

    build.build(DEFAULT, None, echo=print)
    return build.read_index()


@pytest.fixture(scope="session")
def image_registry(built) -> Iterator[str]:
    """The image cache's registry on loopback, for the session."""
    from edgefleet_dev.images import build, oci

    with oci.local_registry(build.cache() / "registry") as reg:
        yield reg


def ref_of(built: dict, registry: str, name: str) -> str:
    return f"{registry}/edgefleet/{name}@{built[name]['digest']}"


def wait_http(url: str, container, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1):
                return
        assert container.running(), f"the container exited:\n{container.output()[-2000:]}"
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{container.output()[-2000:]}")


def infer_top1(base: str, model: str, x: np.ndarray) -> list[int]:
    """Top-1 of each sample, one OIP v2 REST request per sample (bounded by len(x))."""
    meta = json.load(urllib.request.urlopen(f"{base}/v2/models/{model}", timeout=5))
    name = meta["inputs"][0]["name"]
    out = []
    for sample in x:
        body = {"inputs": [{"name": name, "shape": [1, *sample.shape], "datatype": "FP32",
                            "data": sample.astype(np.float32).ravel().tolist()}]}
        req = urllib.request.Request(f"{base}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        resp = json.load(urllib.request.urlopen(req, timeout=10))
        out.append(int(np.argmax(np.asarray(resp["outputs"][0]["data"]))))
    return out
