"""The benchmark Job is a pure function of the request, the class and the settings; its report's reader,
the on-target choice and the rollout gate are pure too."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.api import EdgeDeployment, Variant, builtin_profiles
from edgefleet.api.models import OnTargetResult, RolloutGate
from edgefleet.render.bench_job import (
    BENCH_KEY,
    CANDIDATES_DIR,
    INPUTS_DIR,
    MAX_CANDIDATES,
    WATCH_LABELS,
    BenchCandidate,
    BenchJobRequest,
    bench_job_name,
    bench_key,
    choose_on_target,
    gate_verdict,
    on_target_results,
    render_bench_inputs,
    render_bench_job,
)
from edgefleet.render.compile_job import report_ref
from edgefleet.render.workload import render_class
from edgefleet.settings import Settings
from golden import assert_golden

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "render" / "bench_job_nvidia_gpu.yaml"
PROFILES = {p.metadata["name"]: p for p in builtin_profiles()}
FP32 = BenchCandidate("fp32", "oci://registry.local:5000/edgefleet/models:digits-fp32", "sha256:" + "a" * 64)
INT8 = BenchCandidate("dynamic-int8", "oci://registry.local:5000/edgefleet/models:digits-int8", "sha256:" + "b" * 64)


@pytest.fixture
def settings() -> Settings:
    return Settings(namespace="edgefleet-system", artifact_store="oci://registry.local:5000/edgefleet/models",
                    artifact_insecure=True)


def request(**over) -> BenchJobRequest:
    base = dict(model_namespace="team-a", model_name="digits", generation=3, profile=PROFILES["nvidia-gpu"],
                node="gpu-node-7", candidates=(FP32, INT8), evaluation=b"npz bytes")
    return BenchJobRequest(**{**base, **over})


def test_golden(settings):
    assert_golden("bench_job_nvidia_gpu", render_bench_job(request(), settings))


def _class_pod(profile_name: str) -> dict:
    ed = EdgeDeployment.model_validate({"metadata": {"name": "digits", "namespace": "team-a", "uid": "u"},
                                        "spec": {"modelRef": {"name": "digits"}}})
    variant = Variant(profile=profile_name, artifact=FP32.artifact, digest=FP32.digest, state="Ready")
    profile = PROFILES[profile_name]
    return render_class(ed, profile, variant, list(PROFILES.values()), "/var/lib/edgefleet/cache")["spec"][
        "template"]["spec"]


@pytest.mark.parametrize("profile", ["nvidia-gpu", "coral-edgetpu", "cpu-arm64"])
def test_runs_where_and_as_the_class_serves(settings, profile):
    job = render_bench_job(request(profile=PROFILES[profile]), settings)
    pod = job["spec"]["template"]["spec"]
    served = _class_pod(profile)
    (bench,) = pod["containers"]
    (runtime,) = served["containers"]
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-7"]}]}]}
    assert pod["tolerations"] == served["tolerations"]
    assert pod.get("runtimeClassName") == served.get("runtimeClassName")
    assert bench["image"] == runtime["image"] == PROFILES[profile].spec.runtime_image
    assert bench["resources"] == runtime["resources"]
    assert bench["securityContext"] == runtime["securityContext"]
    devices = [m for m in runtime["volumeMounts"] if m["name"].startswith("dev-")]
    assert [m for m in bench["volumeMounts"] if m["name"].startswith("dev-")] == devices
    assert [v for v in pod["volumes"] if v["name"].startswith("dev-")] == [
        v for v in served["volumes"] if v["name"].startswith("dev-")]


def test_gpu_and_coral_specifics(settings):
    gpu = render_bench_job(request(), settings)["spec"]["template"]["spec"]
    assert gpu["runtimeClassName"] == "nvidia"
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    coral = render_bench_job(request(profile=PROFILES["coral-edgetpu"]), settings)["spec"]["template"]["spec"]
    assert coral["containers"][0]["securityContext"]["privileged"] is True
    assert {"name": "dev-usb", "hostPath": {"path": "/dev/bus/usb"}} in coral["volumes"]


def test_candidates_are_fetched_then_benched_and_reported_to_the_store(settings):
    job = render_bench_job(request(), settings)
    name = job["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    fetches = [c for c in pod["initContainers"] if c["name"] != "prepare-cache"]  # a GPU class prepares the cache
    assert [c["name"] for c in fetches] == ["fetch-0", "fetch-1"]
    assert [f["args"][1:3] for f in fetches] == [[f"--ref={c.artifact}", f"--digest={c.digest}"] for c in (FP32, INT8)]
    assert all(f"--cache={CANDIDATES_DIR}" in f["args"] and "--insecure" in f["args"] for f in fetches)
    args = pod["containers"][0]["args"]
    assert args[0] == "bench"
    assert f"--model={CANDIDATES_DIR}/sha256/{'a' * 64}" in args  # the first candidate is the reference
    assert f"--eval={INPUTS_DIR}/eval.npz" in args and f"--candidates={CANDIDATES_DIR}" in args
    assert f"--report={report_ref(settings.artifact_store, name)}" in args
    assert job["metadata"]["annotations"]["edgefleet.io/report"] == report_ref(settings.artifact_store, name)
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in pod["containers"][0][
        "env"]
    assert WATCH_LABELS.items() <= job["metadata"]["labels"].items()
    assert job["metadata"]["labels"]["edgefleet.io/profile"] == "nvidia-gpu"
    assert job["metadata"]["namespace"] == "edgefleet-system" and "ownerReferences" not in job["metadata"]
    secure = render_bench_job(request(), Settings(namespace="x", artifact_store="oci://r.example/m"))
    assert not any("--insecure" in c["args"] for c in secure["spec"]["template"]["spec"]["initContainers"])


def test_name_is_deterministic_and_changes_with_inputs(settings):
    base = request()
    assert render_bench_job(base, settings)["metadata"]["name"] == render_bench_job(request(), settings)[
        "metadata"]["name"]
    names = {render_bench_job(r, settings)["metadata"]["name"] for r in (
        base, request(node="gpu-node-8"), request(candidates=(INT8, FP32)), request(evaluation=b"other"),
        request(generation=4), request(profile=PROFILES["cpu-amd64"]))}
    assert len(names) == 6
    long = request(model_name="a" * 200, profile=PROFILES["intel-openvino"])
    name = bench_job_name(long, bench_key(long))
    assert len(name) <= 63 and name.startswith("bench-") and not name.startswith("bench--")
    assert render_bench_job(base, settings)["metadata"]["annotations"][BENCH_KEY] == bench_key(base)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="1 to 8 candidates"):
        request(candidates=())
    with pytest.raises(ValueError, match="1 to 8 candidates"):
        request(candidates=tuple(FP32 for _ in range(MAX_CANDIDATES + 1)))
    with pytest.raises(ValueError, match="spec.optimization.evaluation"):
        request(evaluation=None)


def test_inputs_configmap_is_owned_by_the_job(settings):
    job = render_bench_job(request(), settings)
    job["metadata"]["uid"] = "job-uid"
    cm = render_bench_inputs(request(), job)
    assert cm["metadata"]["name"] == job["metadata"]["name"]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "job-uid"
    assert cm["binaryData"] == {"eval.npz": "bnB6IGJ5dGVz"}  # base64 of b"npz bytes"


def test_reads_a_real_bench_report(tmp_path):
    """The runtime's own report (the quickstart model measured here) is what the operator reads."""
    from edgefleet_runtime.bench import Options, bench

    model = REPO / "examples" / "quickstart" / "digits_cnn.onnx"
    report = bench(str(model), str(REPO / "examples" / "quickstart" / "digits_eval.npz"),
                   opts=Options(threads_n=2, runs=5))
    (entry,) = report["results"]
    results = on_target_results(report)
    got = results[entry["digest"]]
    assert got.node == report["node"] and got.threads == 2
    assert (got.latency_p50_ms, got.latency_p95_ms_n) == (entry["p50Ms1"], entry["p95MsN"])
    assert got.peak_memory_bytes == entry["peakRssBytes"] and got.accuracy == entry["accuracy"]
    with pytest.raises(ValueError, match="bench report"):
        on_target_results({"kind": "CompileReport"})


def _result(p50: float, p95: float, p50_n: float, p95_n: float, **over) -> OnTargetResult:
    return OnTargetResult(**{"node": "edge-1", "latency_p50_ms": p50, "latency_p95_ms": p95, "threads": 4,
                             "latency_p50_ms_n": p50_n, "latency_p95_ms_n": p95_n, "throughput_per_second": 900.0,
                             "peak_memory_bytes": 100 << 20, **over})


def test_on_target_choice_can_differ_from_the_host_choice():
    # On the compile host int8 won (the compiler's order: fastest on the host first). On this target int8
    # is slower than fp32 (as the text-direction classifier was on an x86 host), so fp32 is chosen.
    host_order = [INT8.digest, FP32.digest]
    results = {INT8.digest: _result(0.9, 1.1, 0.5, 0.7), FP32.digest: _result(0.4, 0.6, 0.3, 0.4)}
    assert choose_on_target(results, host_order) == FP32.digest
    # only candidates inside the accuracy budget count, and failed measurements never win
    assert choose_on_target(results, [INT8.digest]) == INT8.digest
    results[FP32.digest] = _result(0.4, 0.6, 0.3, 0.4, error="onnxruntime cannot load it")
    assert choose_on_target(results, host_order) == INT8.digest
    assert choose_on_target({}, host_order) is None
    # the serving threads decide which numbers count
    mixed = {INT8.digest: _result(0.3, 0.4, 0.9, 1.0), FP32.digest: _result(0.5, 0.6, 0.4, 0.5)}
    assert choose_on_target(mixed, host_order, threads=1) == INT8.digest
    assert choose_on_target(mixed, host_order) == FP32.digest


def test_gate_blocks_a_slow_variant_and_lets_a_good_one_through():
    gate = RolloutGate(max_latency_p95_ms=1.0, min_throughput=500, max_memory_bytes=200 << 20)
    assert gate_verdict(gate, _result(0.4, 0.6, 0.3, 0.8)) == ("Pass", [])
    verdict, why = gate_verdict(gate, _result(0.4, 0.6, 2.0, 2.5, throughput_per_second=100.0,
                                               peak_memory_bytes=300 << 20))
    assert verdict == "Fail" and len(why) == 3
    assert "p95 latency 2.5 ms on edge-1 exceeds maxLatencyP95Ms 1" in why[0]
    assert "throughput 100.0/s" in why[1] and "maxMemoryBytes 209715200" in why[2]
    # threads=1: the 1-thread p95 is what the runtime will see
    assert gate_verdict(gate, _result(0.4, 0.6, 2.0, 2.5), threads=1) == ("Pass", [])
    assert gate_verdict(gate, None)[0] == "Wait"
    assert gate_verdict(gate, _result(0, 0, 0, 0, error="crashed"))[0] == "Fail"
    assert gate_verdict(None, None) == ("Pass", [])


@pytest.mark.parametrize("profile", ["nvidia-jetson", "nvidia-gpu"])
def test_a_gpu_class_bench_builds_tensorrt_engines_where_serve_finds_them(settings, profile):
    """bench --cache and serve --cache name the same node cache folder, mounted at the same path: the engine
    the bench built under CACHE/tensorrt/<key> is the one serve loads (trtcache keys it the same on both)."""
    from edgefleet.render.workload import CACHE_MOUNT

    pod = render_bench_job(request(profile=PROFILES[profile]), settings)["spec"]["template"]["spec"]
    served = _class_pod(profile)
    (bench,), (runtime,) = pod["containers"], served["containers"]
    assert f"--cache={CACHE_MOUNT}" in bench["args"] and f"--cache={CACHE_MOUNT}" in runtime["args"]
    # the bench writes engines, and only them
    assert {"name": "node-cache", "mountPath": f"{CACHE_MOUNT}/tensorrt", "subPath": "tensorrt"} in bench[
        "volumeMounts"]
    assert {"name": "model-cache", "mountPath": CACHE_MOUNT, "readOnly": True} in runtime["volumeMounts"]
    node_cache = {"path": "/var/lib/edgefleet/cache", "type": "DirectoryOrCreate"}
    assert {"name": "node-cache", "hostPath": node_cache} in pod["volumes"]
    assert {"name": "model-cache", "hostPath": node_cache} in served["volumes"]
    prepare = pod["initContainers"][0]  # hands the root-created hostPath to the runtime user, as serve pods do
    assert prepare["name"] == "prepare-cache" == served["initContainers"][0]["name"]
    assert prepare["args"] == [*served["initContainers"][0]["args"], "--spool=tensorrt"]  # creates the folder
    assert prepare["securityContext"] == served["initContainers"][0]["securityContext"]


@pytest.mark.parametrize("profile", ["cpu-amd64", "intel-openvino", "coral-edgetpu"])
def test_no_engine_cache_where_tensorrt_does_not_run(settings, profile):
    pod = render_bench_job(request(profile=PROFILES[profile]), settings)["spec"]["template"]["spec"]
    assert not any(a.startswith("--cache=") for a in pod["containers"][0]["args"])
    assert all(v["name"] != "node-cache" for v in pod["volumes"])
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-0", "fetch-1"]
    assert not any(a.startswith("--cache=") for a in _class_pod(profile)["containers"][0]["args"])


def test_with_the_cache_driver_the_bench_writes_nothing_of_the_node(settings):
    """The cache driver gives each namespace its own folder: the bench (operator namespace) cannot build into
    the serving namespace's, so it does not mount the node cache at all."""
    driver = settings.model_copy(update={"node_cache_driver": True})
    pod = render_bench_job(request(profile=PROFILES["nvidia-jetson"]), driver)["spec"]["template"]["spec"]
    assert not any(a.startswith("--cache=") for a in pod["containers"][0]["args"])
    assert not any("hostPath" in v and v["name"] == "node-cache" for v in pod["volumes"])


def _report_with_engine(engine_cache) -> dict:
    return {"kind": "BenchReport", "node": "orin-1", "results": [
        {"digest": FP32.digest, "p50Ms1": 1.0, "tensorrt": {"precision": "fp16", "engineCache": engine_cache}}]}


def test_the_engine_key_the_bench_built_reaches_the_variants_status():
    from edgefleet_runtime import trtcache

    stack = trtcache.GpuStack(tensorrt="10.3.0", cuda="12.6", gpu="Orin (nvgpu)", compute_capability="8.7",
                              jetpack="R36.4.0")
    key = trtcache.engine_key(FP32.digest, stack)
    got = on_target_results(_report_with_engine(f"/var/lib/edgefleet/cache/tensorrt/{key}"))[FP32.digest]
    assert got.tensorrt_engine_key == key
    assert got.model_dump(by_alias=True, exclude_none=True)["tensorrtEngineKey"] == key  # status.variants[].onTarget


@pytest.mark.parametrize("engine_cache", [
    "off: needs --cache, the variant digest and a complete GPU stack", "/var/lib/edgefleet/cache/tensorrt/../../x y",
    "/elsewhere/abc", "/c/tensorrt/" + "a" * 200, 42, None])
def test_an_engine_cache_that_is_off_or_hostile_leaves_no_key(engine_cache):
    assert on_target_results(_report_with_engine(engine_cache))[FP32.digest].tensorrt_engine_key is None
