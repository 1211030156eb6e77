"""The benchmark Job against the real control plane and registry: the API server accepts the rendered Job
and its inputs ConfigMap; the test plays the kubelet (kwok runs no containers) by running the Job's init
containers and its bench container locally, and the operator-side reader gets the numbers back from the
registry, keyed by the candidates' digests and naming the node."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from edgefleet.api import builtin_profiles
from edgefleet.artifacts import OCIStore
from edgefleet.reconcile.reports import job_key, read_report
from edgefleet.render.bench_job import (
    CANDIDATES_DIR,
    INPUTS_DIR,
    WORK_DIR,
    BenchCandidate,
    BenchJobRequest,
    on_target_results,
    render_bench_inputs,
    render_bench_job,
)
from edgefleet.render.compile_job import REPORT_KEY_DIR, report_ref
from edgefleet.settings import Settings
from edgefleet_runtime.sealed import BINDING_ENV, KEY_FILE_ENV
from kube_helpers import apply, get

pytestmark = pytest.mark.cluster
QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
NODE = "plain-amd64-0"


def _push(cluster, repo: str, path: Path, name: str) -> BenchCandidate:
    ref = OCIStore(cluster.registry, repo).put(path.read_bytes(), name=name,
                                               media_type="application/vnd.edgefleet.model.onnx", filename=path.name)
    return BenchCandidate(name, ref.ref, ref.digest)


def _run_like_kubelet(job: dict, cm: dict, tmp: Path, key: bytes) -> list[subprocess.CompletedProcess]:
    """Init containers, then the bench container, as local processes. Substitutions, and only these:
    `edgefleet-runtime` is this interpreter's module; the emptyDirs, the inputs ConfigMap and the report-key
    Secret (holding `key`) are local directories; NODE_NAME (the downward API's spec.nodeName) is the node the
    Job is pinned to."""
    keys = tmp / "report-key"
    keys.mkdir()
    (keys / "key").write_text(key.hex())
    pod = job["spec"]["template"]["spec"]
    inputs, cache, work = tmp / "inputs", tmp / "candidates", tmp / "work"
    for d in (inputs, cache, work):
        d.mkdir()
    for key, data in cm["binaryData"].items():
        (inputs / key).write_bytes(base64.b64decode(data))
    node = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][
        0]["matchFields"][0]["values"][0]

    def local(arg: str) -> str:  # --flag=/mount/path... -> --flag=/local/dir/path...
        flag, eq, value = arg.partition("=")
        for mount, here in ((INPUTS_DIR, inputs), (CANDIDATES_DIR, cache), (WORK_DIR, work)):
            if value.startswith(mount):
                return f"{flag}{eq}{here}{value[len(mount):]}"
        return arg

    runs = []
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert c["command"] == ["edgefleet-runtime"]
        env = {**os.environ, "NODE_NAME": node, "HOME": str(work), "TMPDIR": str(work),
               **{e["name"]: e["value"].replace(REPORT_KEY_DIR, str(keys)) for e in c.get("env", [])
                  if e["name"] in (KEY_FILE_ENV, BINDING_ENV)}}
        argv = [sys.executable, "-m", "edgefleet_runtime.cli", *map(local, c["args"])]
        runs.append(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stderr
    return runs


def test_bench_job_reports_on_target_numbers_through_the_registry(cluster, namespace, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    repo = f"edgefleet-benchtest/{namespace}"
    int8 = tmp_path / "digits_int8.onnx"
    quantize_dynamic(str(QUICKSTART / "digits_cnn.onnx"), str(int8), weight_type=QuantType.QInt8)
    fp32 = _push(cluster, repo, QUICKSTART / "digits_cnn.onnx", "fp32")
    dyn = _push(cluster, repo, int8, "dynamic-int8")
    settings = Settings(namespace=namespace, artifact_store=f"oci://{cluster.registry}/{repo}", artifact_insecure=True)
    profile = next(p for p in builtin_profiles() if p.metadata["name"] == "cpu-amd64")
    req = BenchJobRequest(model_namespace=namespace, model_name="digits", generation=1, profile=profile, node=NODE,
                          candidates=(fp32, dyn), evaluation=(QUICKSTART / "digits_eval.npz").read_bytes(), runs=20)
    manifest = render_bench_job(req, settings)
    name = manifest["metadata"]["name"]
    apply(cluster, namespace, manifest)  # the API server validates it (podFailurePolicy, matchFields, ...)
    job = get(cluster, namespace, "job", name)
    apply(cluster, namespace, render_bench_inputs(req, job))
    cm = get(cluster, namespace, "configmap", name)
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

    ref, key = report_ref(settings.artifact_store, name), job_key(b"operator-master-key-".ljust(32, b"k"), name)
    assert read_report(settings, ref, key, name) is None  # nothing before the run
    _run_like_kubelet(job, cm, tmp_path, key)
    report = read_report(settings, ref, key, name)  # sealed with the Job's key, bound to its name
    assert report is not None and report["kind"] == "BenchReport"
    results = on_target_results(report)
    assert set(results) == {fp32.digest, dyn.digest}
    for r in results.values():
        assert r.node == NODE and not r.error
        assert r.latency_p50_ms > 0 and r.latency_p95_ms_n > 0 and r.throughput_per_second > 0
        assert r.peak_memory_bytes > 0 and r.accuracy > 0.9
    assert json.dumps(report)  # plain JSON, as the operator stores it
