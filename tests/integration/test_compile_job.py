"""Compile executor `job` against the real control plane: the operator starts a compile Job, the test plays
the kubelet (kwok runs no containers) by running that Job's command locally, and the operator reads the
report the command pushed to the registry back into the EdgeModel's status."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from edgefleet.artifacts import OCIStore
from edgefleet.render.compile_job import CACHE_DIR, INPUTS_DIR, REPORT_KEY_DIR, WORK_DIR
from edgefleet.render.workload import REGISTRY_TOKEN_DIR
from kube_helpers import apply, get, items, wait_for

pytestmark = pytest.mark.cluster
MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
TARGETS = ["cpu-amd64", "cpu-arm64"]


@pytest.fixture
def operator_namespace(cluster):
    name = f"op-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def job_operator(edgefleet_api, namespace, operator_namespace):
    """The operator with EDGEFLEET_COMPILE_EXECUTOR=job, watching only the test's two namespaces (so it
    leaves other tests' models alone), its compile Jobs in `operator_namespace`."""
    with running_operator(edgefleet_api, [namespace, operator_namespace], operator_namespace) as runner:
        yield runner


@contextlib.contextmanager
def running_operator(edgefleet_api, watched: list[str], operator_namespace: str):
    from kopf.testing import KopfRunner

    env = {
        "KUBECONFIG": str(edgefleet_api.kubeconfig),
        "EDGEFLEET_COMPILE_EXECUTOR": "job",
        "EDGEFLEET_NAMESPACE": operator_namespace,
        "EDGEFLEET_COMPILER_IMAGE": "ghcr.io/edgefleet/compiler:test",
        "EDGEFLEET_ARTIFACT_STORE": f"oci://{edgefleet_api.registry}/edgefleet-jobtest",
        "EDGEFLEET_ARTIFACT_INSECURE": "true",
        "EDGEFLEET_RESYNC_SECONDS": "3",
        "EDGEFLEET_COMPILE_TIMING_RUNS": "5",
        "EDGEFLEET_COMPILE_RESOURCES": json.dumps({"requests": {"cpu": "100m", "memory": "256Mi"}}),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with KopfRunner(["run", "--standalone", *(f"--namespace={n}" for n in watched),
                         "-m", "edgefleet.handlers"], timeout=60) as runner:
            yield runner
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert runner.exit_code == 0, runner.output


def run_like_kubelet(cluster, job: dict, tmp: Path) -> subprocess.CompletedProcess:
    """Run the Job's container as a local process. Substitutions, and only these: `edgefleet` is this
    interpreter's CLI; the mounted inputs ConfigMap and report-key Secret are written out from the API into local
    directories, the projected registry token is one the API server makes for the Job's ServiceAccount; the
    emptyDir work directory (/tmp: cache, HOME, TMPDIR) is a local directory."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    cm = get(cluster, job["metadata"]["namespace"], "configmap", volumes["inputs"]["configMap"]["name"])
    secret = get(cluster, job["metadata"]["namespace"], "secret", volumes["report-key"]["secret"]["secretName"])
    inputs, work, keys = tmp / "inputs", tmp / "work", tmp / "report-key"
    for d in (inputs, work, keys):
        d.mkdir()
    for key, data in (cm.get("binaryData") or {}).items():
        (inputs / key).write_bytes(base64.b64decode(data))
    (keys / "key").write_bytes(base64.b64decode(secret["data"]["key"]))
    pod = job["spec"]["template"]["spec"]
    (token := tmp / "registry-token").mkdir()  # the projected token, from the Job's own ServiceAccount
    audience = volumes["registry-token"]["projected"]["sources"][0]["serviceAccountToken"]["audience"]
    (token / "token").write_text(cluster.kubectl("create", "token", pod["serviceAccountName"], "-n",
                                                 job["metadata"]["namespace"], f"--audience={audience}").stdout)

    def local(arg: str) -> str:
        return arg.replace(INPUTS_DIR, str(inputs)).replace(CACHE_DIR, str(work / "edgefleet-cache"))

    assert container["command"] == ["edgefleet", "compile"]
    argv = [sys.executable, "-m", "edgefleet.cli", "compile", *map(local, container["args"])]
    env = {**os.environ, **{e["name"]: e["value"].replace(WORK_DIR, str(work)).replace(REPORT_KEY_DIR, str(keys))
                            .replace(REGISTRY_TOKEN_DIR, str(token)) for e in container["env"]},
           "OMP_NUM_THREADS": "2"}  # keep CPU moderate on a shared machine
    env.pop("EDGEFLEET_CACHE", None)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def model_status(cluster, namespace: str) -> dict:
    return get(cluster, namespace, "edgemodel", "digits").get("status", {})


def push_source(cluster, namespace: str):
    return OCIStore(cluster.registry, f"edgefleet-jobtest/{namespace}/source").put(
        (MODELS / "digits_cnn.onnx").read_bytes(), name="digits", media_type="application/vnd.edgefleet.model.onnx",
        filename="digits_cnn.onnx")


def the_job(cluster, operator_namespace: str) -> dict:
    jobs = wait_for(lambda: items(cluster, operator_namespace, "jobs", "-l", "edgefleet.io/model=digits"),
                    timeout=60, what="the operator's compile Job")
    assert len(jobs) == 1
    return jobs[0]


def test_compile_job_results_come_back_from_the_registry(job_operator, cluster, namespace, operator_namespace,
                                                         tmp_path):
    ref = push_source(cluster, namespace)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "digits-data", "namespace": namespace},
          "binaryData": {"digits_eval.npz": base64.b64encode((MODELS / "digits_eval.npz").read_bytes()).decode()}}
    em = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
          "metadata": {"name": "digits", "namespace": namespace},
          "spec": {"source": {"uri": ref.ref, "digest": ref.digest}, "format": "onnx",
                   "optimization": {"quantization": "dynamic-int8",
                                    "evaluation": {"configMap": {"name": "digits-data", "key": "digits_eval.npz"}},
                                    "accuracyBudget": {"maxAccuracyDrop": 5.0}},
                   "targetProfiles": {"names": TARGETS}}}
    apply(cluster, namespace, [cm, em])

    job = the_job(cluster, operator_namespace)
    assert job["metadata"]["labels"]["edgefleet.io/model-namespace"] == namespace
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/edgefleet/compiler:test"
    wait_for(lambda: items(cluster, operator_namespace, "configmaps", "-l", "edgefleet.io/model=digits"),
             timeout=30, what="the compile Job's inputs ConfigMap")
    status = model_status(cluster, namespace)
    assert [v["state"] for v in status["variants"]] == ["Compiling"] * len(TARGETS)
    assert next(c for c in status["conditions"] if c["type"] == "Compiled")["reason"] == "Compiling"

    done = run_like_kubelet(cluster, job, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = {line.split("\t")[0]: line.split("\t") for line in done.stdout.splitlines() if "\t" in line}
    assert set(printed) == set(TARGETS) and all(p[1] == "Ready" for p in printed.values()), done.stdout

    wait_for(lambda: any(c["type"] == "Complete" and c["status"] == "True" for c in get(
        cluster, operator_namespace, "job", job["metadata"]["name"]).get("status", {}).get("conditions", [])),
        timeout=60, what="kwok completing the compile Job")

    def ready_in(ns: str):
        vs = model_status(cluster, ns).get("variants", [])
        return vs if vs and all(v["state"] == "Ready" for v in vs) else None

    variants = {v["profile"]: v for v in wait_for(lambda: ready_in(namespace), timeout=60,
                                                  what="variants Ready from the report")}
    assert set(variants) == set(TARGETS)
    for profile, v in variants.items():
        assert v["digest"] == printed[profile][3]  # what the local "Job" produced, read back via the registry
        assert v["artifact"] == printed[profile][5]
        assert v["artifact"].startswith(f"oci://{cluster.registry}/edgefleet-jobtest@")
        assert v["quantization"] == "dynamic-int8" and v["sizeBytes"] > 0
    status = model_status(cluster, namespace)
    compiled = next(c for c in status["conditions"] if c["type"] == "Compiled")
    assert compiled["status"] == "True" and compiled["reason"] == "CompileFinished"
    assert status["observedGeneration"] == get(cluster, namespace, "edgemodel", "digits")["metadata"]["generation"]
    # one Job per generation: reconciles after it finished did not start another
    assert len(items(cluster, operator_namespace, "jobs", "-l", "edgefleet.io/model=digits")) == 1

    # the same model in another namespace: a compile of its own (the cache never crosses namespaces)
    apply(cluster, operator_namespace, [{**cm, "metadata": {**cm["metadata"], "namespace": operator_namespace}},
                                        {**em, "metadata": {**em["metadata"], "namespace": operator_namespace}}])

    def two_jobs():
        jobs = items(cluster, operator_namespace, "jobs", "-l", "edgefleet.io/model=digits")
        return jobs if len(jobs) == 2 else None

    jobs = wait_for(two_jobs, timeout=60, what="a compile Job for the second namespace")
    assert sorted(j["metadata"]["labels"]["edgefleet.io/model-namespace"] for j in jobs) == sorted(
        [namespace, operator_namespace])


def test_request_failure_in_the_job_reaches_status(job_operator, cluster, namespace, operator_namespace, tmp_path):
    """A wrong source digest: the Job's command exits 2 and pushes an error report; the variants say why
    (the reason the compiler printed, not a generic CompileJobFailed)."""
    ref = push_source(cluster, namespace)
    wrong = "sha256:" + "0" * 64
    em = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
          "metadata": {"name": "digits", "namespace": namespace},
          "spec": {"source": {"uri": ref.ref, "digest": wrong}, "format": "onnx",
                   "targetProfiles": {"names": ["cpu-amd64", "no-such-profile"]}}}
    apply(cluster, namespace, em)
    done = run_like_kubelet(cluster, the_job(cluster, operator_namespace), tmp_path)
    assert done.returncode == 2 and wrong in done.stderr, done.stderr[-2000:]
    reason = next(line.split(":")[1].strip() for line in done.stderr.splitlines() if line.startswith("error: "))

    def settled():
        vs = model_status(cluster, namespace).get("variants", [])
        return vs if vs and all(v["state"] == "Failed" for v in vs) else None

    variants = {v["profile"]: v for v in wait_for(settled, timeout=60, what="variants Failed from the error report")}
    assert variants["cpu-amd64"]["reason"] == reason and wrong in variants["cpu-amd64"]["message"]
    assert variants["no-such-profile"]["reason"] == "ProfileNotFound"
    degraded = next(c for c in model_status(cluster, namespace)["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True"


def test_a_compile_job_into_a_missing_namespace_fails_the_variants_with_the_fix(edgefleet_api, cluster, namespace):
    """The operator's namespace does not exist (an operator run on a host with the default): the API server's
    404 on the Job is reported once in status with the fix, not retried forever."""
    missing = f"gone-{uuid.uuid4().hex[:8]}"
    with running_operator(edgefleet_api, [namespace], missing):
        ref = push_source(cluster, namespace)
        apply(cluster, namespace, {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
                                   "metadata": {"name": "digits", "namespace": namespace},
                                   "spec": {"source": {"uri": ref.ref, "digest": ref.digest}, "format": "onnx",
                                            "targetProfiles": {"names": TARGETS}}})

        def failed():
            vs = model_status(cluster, namespace).get("variants", [])
            return vs if vs and all(v["state"] == "Failed" for v in vs) else None

        variants = wait_for(failed, timeout=60, what="variants Failed: the namespace is missing")

        def warnings():
            return [e for e in items(cluster, namespace, "events") if e["reason"] == "NamespaceNotFound"]

        wait_for(warnings, timeout=30, what="a NamespaceNotFound event")
        time.sleep(6)  # two more resyncs (3 s): still one event, posted on the transition
        events = warnings()
    assert {v["reason"] for v in variants} == {"NamespaceNotFound"}
    assert f"namespace {missing} does not exist" in variants[0]["message"]
    assert f"kubectl create namespace {missing}" in variants[0]["message"]
    assert len(events) == 1 and events[0]["type"] == "Warning", events
