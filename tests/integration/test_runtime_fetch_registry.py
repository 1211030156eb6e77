"""Compiler -> OCI registry -> ``edgefleet-runtime fetch`` -> ``serve``, with the operator's own pod args.

The variant is pushed to the dev cluster's registry (CNCF distribution, plain http on loopback) with
``OCIStore``; the init container's and the runtime container's args come from
``edgefleet.render.render_class`` (only the node cache path and the port are replaced), and run here
as subprocesses exactly as the pod would run them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from edgefleet.api import EdgeDeployment, Variant, builtin_profiles
from edgefleet.artifacts import OCIStore
from edgefleet.compiler import CompileRequest, CompileTarget, Policy, compile_model
from edgefleet.render import render_class
from edgefleet.render.workload import CACHE_MOUNT
from edgefleet_dev.net import free_port

pytestmark = pytest.mark.cluster
M = Path(__file__).resolve().parent.parent / "fixtures" / "models"
RUNTIME = [sys.executable, "-m", "edgefleet_runtime.cli"]

CASES = {
    # profile -> (target, policy): a gzip'd pruned ONNX and an OpenVINO IR zip, the two packed formats
    "cpu-amd64": (CompileTarget(format="onnx", precision="fp32", runtime="onnxruntime"),
                  Policy(quantization="none", sparsity=0.3, evaluation=M / "digits_eval.npz", timingRuns=2,
                         threads=1)),
    "intel-openvino": (CompileTarget(format="openvino", precision="int8", runtime="openvino"),
                       Policy(calibration=M / "digits_calib.npz", evaluation=M / "digits_eval.npz", timingRuns=2,
                              threads=1)),
}
MAGIC = {"cpu-amd64": b"\x1f\x8b", "intel-openvino": b"PK\x03\x04"}


def _pod_args(ref: str, digest: str, profile_name: str) -> tuple[list[str], list[str]]:
    """(init container args, runtime container args) as the operator renders them."""
    profiles = builtin_profiles()
    profile = next(p for p in profiles if p.metadata["name"] == profile_name)
    ed = EdgeDeployment(metadata={"name": "digits", "namespace": "default", "uid": str(uuid.uuid4())},
                        spec={"model_ref": {"name": "digits"}})
    variant = Variant(profile=profile_name, artifact=ref, digest=digest, state="Ready")
    pod = render_class(ed, profile, variant, profiles, CACHE_MOUNT)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["prepare-cache", "fetch-model"]
    init, (serve,) = pod["initContainers"][1], pod["containers"]
    assert init["command"] == serve["command"] == ["edgefleet-runtime"]
    return init["args"], serve["args"]


def _local(args: list[str], cache: Path, port: int | None = None) -> list[str]:
    """The rendered args with the node cache at ``cache`` (and the listener on loopback:port)."""
    out = [a.replace(CACHE_MOUNT, str(cache)) for a in args]
    if port is not None:
        out = [a for a in out if not a.startswith("--port=")] + [f"--port={port}", "--host=127.0.0.1"]
    return out


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*RUNTIME, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("profile", list(CASES))
def test_fetch_from_registry_with_rendered_args_then_serve(cluster, tmp_path, profile):
    store = OCIStore(cluster.registry, f"edgefleet-test/{uuid.uuid4().hex[:8]}", insecure=True)
    target, policy = CASES[profile]
    v = compile_model(CompileRequest(str(M / "digits_cnn.onnx"), {profile: target}, policy), store,
                      tmp_path / "compile").variants[profile]
    assert v.state == "Ready", (v.reason, v.message)
    assert v.artifact.startswith(f"oci://{cluster.registry}/") and "@sha256:" in v.artifact
    hexd = v.digest.split(":", 1)[1]

    fetch_args, serve_args = _pod_args(v.artifact, v.digest, profile)
    assert fetch_args == ["fetch", f"--ref={v.artifact}", f"--digest={v.digest}", f"--cache={CACHE_MOUNT}",
                          "--name=digits"]
    assert f"--model={CACHE_MOUNT}/sha256/{hexd}" in serve_args and f"--digest={v.digest}" in serve_args

    cache = tmp_path / "node-cache"
    r = _run(_local(fetch_args, cache))
    assert r.returncode == 0, r.stderr
    blob = cache / "sha256" / hexd
    assert r.stdout.strip() == str(blob)
    assert (cache / "current" / "digits").resolve() == blob.resolve()
    assert blob.read_bytes().startswith(MAGIC[profile])  # the stored (packed) bytes, as published

    # the second fetch is a no-op: with the registry unreachable (an offline node) the cached blob serves
    dead = re.sub(r"^oci://[^/]+/", "oci://127.0.0.1:1/", v.artifact)
    r = _run(_local([a.replace(v.artifact, dead) for a in fetch_args], cache))
    assert r.returncode == 0, r.stderr
    assert "already cached" in r.stderr and r.stdout.strip() == str(blob)

    port = free_port()
    proc = subprocess.Popen([*RUNTIME, *_local(serve_args, cache, port)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "serve.log", "wb"))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(base + "/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        ev = np.load(M / "digits_eval.npz")
        x, y = ev["input"][:64].astype(np.float32), ev["y"][:64]
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        req = urllib.request.Request(base + "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = json.loads(resp.read())
        assert out["model_version"] == hexd[:12]
        logits = np.asarray(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
        assert np.mean(logits.argmax(1) == y) >= v.metrics.accuracy - 0.05
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
