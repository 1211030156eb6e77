"""spec.monitoring.drift and spec.feedback in the EdgeDeployment reconciler (in-memory fake of the one writer): the
runtime gets the flags, the evaluation data and the spool; the operator reads the pods' /metrics (a real HTTP
server on loopback here) and sets Drifting per class with the statistic and the threshold; nothing is read or
scheduled when drift is off."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from edgefleet.api import EdgeDeployment, builtin_profiles
from edgefleet.reconcile import World, reconcile_deployment
from edgefleet.render.workload import SPOOL_MOUNT, spool_path
from edgefleet.settings import Settings
from fake_kube import FakeKube

NS = "shop"
DIGEST = "sha256:" + "ab" * 32
NODES = {"rpi-0": {"kubernetes.io/arch": "arm64"}, "rpi-1": {"kubernetes.io/arch": "arm64"}}
DRIFT = {"threshold": 0.2, "windowSize": 200, "intervalSeconds": 30}
HARD = {"confidenceBelow": 0.6, "sampleRate": 0.5, "maxBytesPerNode": 1 << 20,
        "destination": "oci://registry.local:5000/fleet/hard", "batchSize": 20, "uploadIntervalSeconds": 15}


def metrics_text(psi: dict[str, float], samples: int) -> str:
    lines = ["# TYPE edgefleet_runtime_drift_psi gauge"]
    lines += [f'edgefleet_runtime_drift_psi{{statistic="{k}"}} {v}' for k, v in psi.items()]
    lines += ["# TYPE edgefleet_runtime_drift_window_samples gauge",
              f"edgefleet_runtime_drift_window_samples {samples}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def runtime_metrics():
    """A loopback HTTP server answering /metrics with whatever the test puts in ``state["text"]``."""
    state = {"text": "", "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            state["requests"] += 1
            body = state["text"].encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["port"] = server.server_address[1]
    yield state
    server.shutdown()


def make_kube(spec_extra: dict, evaluation: dict | None, port: int = 8080) -> FakeKube:
    kube = FakeKube()
    optimization = {"evaluation": evaluation} if evaluation else {}
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx",
                       "optimization": optimization},
              "status": {"variants": [{"profile": "cpu-arm64", "state": "Ready", "format": "onnx", "digest": DIGEST,
                                       "artifact": f"oci://registry.local/edgefleet@{DIGEST}"}]}})
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": NS, "generation": 1, "uid": "u-1"},
              "spec": {"modelRef": {"name": "digits"}, "runtime": {"port": port}, **spec_extra}})
    return kube


def add_pod(kube: FakeKube, name: str, node: str, ready: bool = True) -> None:
    kube.add({"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": name, "namespace": NS, "labels": {
                  "app.kubernetes.io/name": "edgefleet-runtime", "app.kubernetes.io/instance": "digits",
                  "app.kubernetes.io/managed-by": "edgefleet", "edgefleet.io/deployment": "digits",
                  "app.kubernetes.io/component": "cpu-arm64", "edgefleet.io/profile": "cpu-arm64"}},
              "spec": {"nodeName": node},
              "status": {"podIP": "127.0.0.1",
                         "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


CLOCK = [1000.0]


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """The drift throttle's clock: each reconcile() below moves it one interval on, unless a test holds it."""
    from edgefleet.reconcile import drift

    monkeypatch.setattr(drift, "THROTTLE", drift.Throttle(lambda: CLOCK[0]))
    import edgefleet.reconcile.deployment as deployment

    monkeypatch.setattr(deployment, "THROTTLE", drift.THROTTLE)
    return CLOCK


def reconcile(kube, advance: float = DRIFT["intervalSeconds"]) -> float | None:
    CLOCK[0] += advance
    return reconcile_deployment(kube, Settings(), NS, "digits", World(dict(NODES), builtin_profiles()))


def drifting(kube) -> dict | None:
    conds = kube.stored("EdgeDeployment", "digits", NS)["status"]["conditions"]
    return next((c for c in conds if c["type"] == "Drifting"), None)


def runtime(kube) -> dict:
    ds = kube.stored("DaemonSet", "digits-cpu-arm64", NS)
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return c | {"volumes": ds["spec"]["template"]["spec"]["volumes"],
                "init": ds["spec"]["template"]["spec"]["initContainers"]}


def test_drift_off_reads_no_metrics_schedules_nothing_and_the_runtime_gets_no_monitoring_flags(runtime_metrics):
    kube = make_kube({}, {"configMap": {"name": "digits-data", "key": "eval.npz"}}, runtime_metrics["port"])
    add_pod(kube, "digits-cpu-arm64-a", "rpi-0")
    runtime_metrics["text"] = metrics_text({"input": 5.0}, 200)
    assert reconcile(kube) in (None, 15.0)  # at most the not-ready recheck of the rollout, never a drift timer
    assert runtime_metrics["requests"] == 0
    assert drifting(kube) is None
    args = runtime(kube)["args"]
    assert not any(a.startswith(("--monitoring", "--drift", "--hard-examples")) for a in args)


def test_drift_sets_drifting_per_class_with_statistic_and_threshold(runtime_metrics):
    kube = make_kube({"monitoring": {"confidenceBelow": 0.7, "drift": DRIFT}},
                     {"configMap": {"name": "digits-data", "key": "eval.npz"}}, runtime_metrics["port"])
    for i, node in enumerate(NODES):
        add_pod(kube, f"digits-cpu-arm64-{i}", node)
    runtime_metrics["text"] = metrics_text({"classes": 0.01, "confidence": 0.02, "input": 0.03}, 120)
    wait = reconcile(kube)
    assert wait is not None and wait <= DRIFT["intervalSeconds"]
    c = runtime(kube)
    assert {"--monitoring", "--uncertain-below=0.7", "--drift-window=200", "--drift-threshold=0.2",
            "--drift-eval=/etc/edgefleet/evaluation/data.npz"} <= set(c["args"])
    volume = {"name": "evaluation-data",
              "configMap": {"name": "digits-data", "items": [{"key": "eval.npz", "path": "data.npz"}]}}
    assert volume in c["volumes"]
    cond = drifting(kube)
    assert cond["status"] == "Unknown" and cond["reason"] == "NotEnoughData"
    assert "cpu-arm64: 120/200 predictions" in cond["message"]
    assert runtime_metrics["requests"] == 2  # both Ready pods, once

    runtime_metrics["text"] = metrics_text({"classes": 0.01, "confidence": 0.02, "input": 0.03}, 200)
    reconcile(kube)
    cond = drifting(kube)
    assert (cond["status"], cond["reason"]) == ("False", "WithinThreshold")
    assert "cpu-arm64: classes PSI 0.01, confidence PSI 0.02, input PSI 0.03 < 0.2 on 2 pods" in cond["message"]

    runtime_metrics["text"] = metrics_text({"classes": 0.05, "confidence": 0.31, "input": 1.84}, 200)
    reconcile(kube)
    cond = drifting(kube)
    assert (cond["status"], cond["reason"]) == ("True", "DistributionShift")
    assert "cpu-arm64: confidence PSI 0.31 >= 0.2, input PSI 1.84 >= 0.2 on 2/2 pods" in cond["message"]
    assert [e["type"] for e in kube.events if e["reason"] == "DistributionShift"] == ["Warning"]
    reconcile(kube)  # no new event while it stays drifting
    assert len([e for e in kube.events if e["reason"] == "DistributionShift"]) == 1


def test_drift_reads_at_most_once_per_interval_and_at_once_after_a_spec_change(runtime_metrics):
    kube = make_kube({"monitoring": {"drift": DRIFT}}, {"configMap": {"name": "d", "key": "e.npz"}},
                     runtime_metrics["port"])
    add_pod(kube, "digits-cpu-arm64-0", "rpi-0")
    runtime_metrics["text"] = metrics_text({"input": 0.01}, 200)
    reconcile(kube)
    assert runtime_metrics["requests"] == 1
    for _ in range(3):  # child events, resyncs: inside the interval nothing is read again
        reconcile(kube, advance=DRIFT["intervalSeconds"] / 4)
    assert runtime_metrics["requests"] == 1
    reconcile(kube, advance=DRIFT["intervalSeconds"])
    assert runtime_metrics["requests"] == 2
    ed = kube.stored("EdgeDeployment", "digits", NS)
    ed["metadata"]["generation"] = 2  # a spec change reads at once
    reconcile(kube, advance=0)
    assert runtime_metrics["requests"] == 3


def test_drift_bounds_the_pods_read_per_class_and_reports_unreadable_ones(runtime_metrics):
    kube = make_kube({"monitoring": {"drift": {**DRIFT, "maxPodsPerClass": 1}}},
                     {"configMap": {"name": "digits-data", "key": "eval.npz"}}, runtime_metrics["port"])
    for i in range(3):
        add_pod(kube, f"digits-cpu-arm64-{i}", f"rpi-{i % 2}")
    runtime_metrics["text"] = metrics_text({"input": 0.5}, 200)
    reconcile(kube)
    assert runtime_metrics["requests"] == 1
    assert drifting(kube)["status"] == "True" and "worst digits-cpu-arm64-0 on rpi-0" in drifting(kube)["message"]

    kube2 = make_kube({"monitoring": {"drift": DRIFT}}, {"configMap": {"name": "d", "key": "e.npz"}}, port=1)
    add_pod(kube2, "digits-cpu-arm64-0", "rpi-0")
    reconcile(kube2)
    cond = drifting(kube2)
    assert cond["status"] == "Unknown"
    assert "metrics of 1 pods unreadable (digits-cpu-arm64-0: ConnectionError: [Errno 111] Connection refused" in (
        cond["message"])


def test_drift_without_mountable_evaluation_data_says_what_to_set(runtime_metrics):
    kube = make_kube({"monitoring": {"drift": DRIFT}}, {"uri": "https://data.local/eval.npz"}, runtime_metrics["port"])
    add_pod(kube, "digits-cpu-arm64-0", "rpi-0")
    reconcile(kube)
    cond = drifting(kube)
    assert (cond["status"], cond["reason"]) == ("Unknown", "EvaluationDataMissing")
    assert "spec.optimization.evaluation is a uri" in cond["message"] and "configMap" in cond["message"]
    assert [e["type"] for e in kube.events if e["reason"] == "EvaluationDataMissing"] == ["Warning"]
    assert not any(a.startswith("--drift-eval") for a in runtime(kube)["args"])
    assert runtime_metrics["requests"] == 0  # nothing to read without a reference


def test_hard_examples_spool_on_the_node_cache_and_upload_flags():
    kube = make_kube({"feedback": {"hardExamples": HARD}}, None)
    reconcile(kube)
    c = runtime(kube)
    ed = EdgeDeployment.model_validate(kube.stored("EdgeDeployment", "digits", NS))
    assert spool_path(ed) == f"hard-examples/{NS}/digits"
    assert {f"--hard-examples-dir={SPOOL_MOUNT}", "--hard-examples-below=0.6", "--hard-examples-sample-rate=0.5",
            f"--hard-examples-max-bytes={1 << 20}", "--hard-examples-upload=oci://registry.local:5000/fleet/hard",
            "--hard-examples-batch=20", "--hard-examples-upload-interval=15"} <= set(c["args"])
    # the spool is a read-write folder of the node cache (survives restarts); the cache itself stays read-only
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[SPOOL_MOUNT] == {"name": "model-cache", "mountPath": SPOOL_MOUNT, "subPath": spool_path(ed)}
    assert mounts["/var/lib/edgefleet/cache"]["readOnly"] is True
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    # the push needs scratch space and the root filesystem is read-only: a small emptyDir at /tmp
    assert mounts["/tmp"]["name"] == "tmp" and {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}} in c["volumes"]
    prepare = next(i for i in c["init"] if i["name"] == "prepare-cache")
    assert f"--spool={spool_path(ed)}" in prepare["args"]  # created and handed to the runtime user
