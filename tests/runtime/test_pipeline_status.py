"""Unreachable pipeline sources and sinks reach the user: a real pipeline (the quickstart model, a real Mosquitto
broker, an MJPEG stream served by ffmpeg) exports which of its parts work on /metrics, and the EdgeDeployment
reconciler (in-memory fake of the one writer) reads that over HTTP and sets Degraded with the part's name, URL and
fix, one Warning event per transition, and clears it once the parts are back."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest
from edgefleet.api import builtin_profiles
from edgefleet.reconcile import World, drift, pipeline_health, reconcile_deployment
from edgefleet.settings import Settings
from edgefleet_runtime.pipeline.config import parse
from edgefleet_runtime.pipeline.runner import Pipeline
from fake_kube import FakeKube
from pipeline_helpers import FFMPEG, Broker, free_port, need
from prometheus_client import start_http_server
from test_pipeline import TRANSFORM, digit_frames, loaded_model

NS = "line"
DIGEST = "sha256:" + "ab" * 32
NODES = {"rpi-0": {"kubernetes.io/arch": "arm64"}}
CLOCK = [1000.0]


@pytest.fixture(autouse=True)
def throttle(monkeypatch):
    """The pipeline read's throttle on a clock each reconcile() moves one interval on; a part counts as down
    after 1 s here instead of 20 (the seconds themselves are the pipeline's own, measured)."""
    import edgefleet.reconcile.deployment as deployment

    t = drift.Throttle(lambda: CLOCK[0], interval=lambda ed: pipeline_health.READ_INTERVAL_SECONDS)
    monkeypatch.setattr(deployment, "PIPELINE_THROTTLE", t)
    monkeypatch.setattr(pipeline_health, "DOWN_GRACE_SECONDS", 1.0)


def make_kube(pipeline: dict) -> FakeKube:
    kube = FakeKube()
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
              "metadata": {"name": "digits", "namespace": NS},
              "spec": {"source": {"uri": "https://models.local/digits.onnx"}, "format": "onnx", **TRANSFORM},
              "status": {"variants": [{"profile": "cpu-arm64", "state": "Ready", "format": "onnx", "digest": DIGEST,
                                       "artifact": f"oci://registry.local/edgefleet@{DIGEST}"}]}})
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "cam", "namespace": NS, "generation": 1, "uid": "u-1"},
              "spec": {"modelRef": {"name": "digits"}, "pipeline": pipeline}})
    kube.add({"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "cam-cpu-arm64-x1", "namespace": NS, "labels": {
                  "app.kubernetes.io/name": "edgefleet-runtime", "app.kubernetes.io/instance": "cam",
                  "app.kubernetes.io/managed-by": "edgefleet", "edgefleet.io/deployment": "cam",
                  "app.kubernetes.io/component": "cpu-arm64", "edgefleet.io/profile": "cpu-arm64"}},
              "spec": {"nodeName": "rpi-0"},
              "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}})
    return kube


def reconcile(kube: FakeKube) -> float | None:
    CLOCK[0] += pipeline_health.READ_INTERVAL_SECONDS
    return reconcile_deployment(kube, Settings(), NS, "cam", World(dict(NODES), builtin_profiles()))


def degraded(kube: FakeKube) -> dict:
    conds = kube.stored("EdgeDeployment", "cam", NS)["status"]["conditions"]
    return next(c for c in conds if c["type"] == "Degraded")


def up(port: int, part: str, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    line = next((ln for ln in text.splitlines() if ln.startswith(f'edgefleet_pipeline_{part}_up{{{part}="{name}"}}')),
                None)
    return float(line.rpartition(" ")[2]) if line else None


def wait_until(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_pipeline_unreachable_source_and_sink_degrade_the_deployment_until_they_are_back(tmp_path):
    digit_frames(tmp_path / "frames", 5)
    stream_port, broker_port, metrics_port = free_port(), free_port(), free_port()
    stream = f"http://127.0.0.1:{stream_port}/stream"
    spec = {"sources": [{"name": "files", "kind": "directory", "url": str(tmp_path / "frames"), "fps": 20,
                         "loop": True},
                        {"name": "cam", "kind": "mjpeg", "url": stream, "timeoutSeconds": 1, "retryMaxSeconds": 0.3}],
            "sinks": [{"name": "broker", "batch": 4,
                       "mqtt": {"host": "127.0.0.1", "port": broker_port, "timeoutSeconds": 1}}],
            "metricsPort": metrics_port}
    config = {"name": "cam", **{k: v for k, v in spec.items() if k != "metricsPort"},
              "queue": {"path": str(tmp_path / "queue")}}
    pipeline = Pipeline(parse(json.dumps(config)), loaded_model())
    server, _ = start_http_server(metrics_port, "127.0.0.1", registry=pipeline.metrics.registry)
    stop = threading.Event()
    runner = threading.Thread(target=pipeline.run, args=(stop, 5))
    runner.start()
    kube = make_kube(spec)
    broker = Broker(tmp_path, broker_port)
    ffmpeg = None
    try:
        # nothing listens on the stream's port or the broker's: both are down, and said so on /metrics
        wait_until(lambda: up(metrics_port, "source", "cam") == 0 and up(metrics_port, "sink", "broker") == 0)
        assert up(metrics_port, "source", "files") == 1
        time.sleep(1.2)  # past the (test's) grace
        assert reconcile(kube) is not None  # it looks again
        cond = degraded(kube)
        assert cond["status"] == "True" and cond["reason"] == "PipelineSourceUnreachable"
        assert f"source 'cam' (mjpeg {stream}) unreachable" in cond["message"]
        assert "spec.pipeline.sources[1].url" in cond["message"]  # the field to fix
        assert f"sink 'broker' (mqtt 127.0.0.1:{broker_port}) unreachable" in cond["message"]
        assert "cam-cpu-arm64-x1 on rpi-0" in cond["message"]
        assert "source 'files'" not in cond["message"]
        assert [(e["reason"], e["type"]) for e in kube.warnings()] == [("PipelineSourceUnreachable", "Warning")]

        # the broker comes back: the queue drains, only the source is left
        broker.start()
        wait_until(lambda: up(metrics_port, "sink", "broker") == 1)
        reconcile(kube)
        cond = degraded(kube)
        assert cond["reason"] == "PipelineSourceUnreachable" and "sink 'broker'" not in cond["message"]
        assert len(kube.warnings()) == 1  # same condition, same reason: no second event

        # the stream comes up (ffmpeg serves MJPEG there): the pipeline reconnects by itself, Degraded clears
        ffmpeg = subprocess.Popen([need(FFMPEG, "ffmpeg"), "-v", "error", "-re", "-f", "lavfi", "-i",
                                   "testsrc=size=320x240:rate=10", "-t", "60", "-q:v", "5", "-f", "mpjpeg",
                                   "-listen", "1", stream])
        wait_until(lambda: up(metrics_port, "source", "cam") == 1)
        reconcile(kube)
        cond = degraded(kube)
        assert cond["status"] == "False", cond["message"]
    finally:
        stop.set()
        runner.join(30)
        server.shutdown()
        broker.stop()
        if ffmpeg is not None:
            ffmpeg.kill()
            ffmpeg.wait()


def test_pipeline_status_unreadable_metrics_degrade_nothing(tmp_path):
    """A pod whose pipeline /metrics cannot be read tells nothing: no Degraded from it, and its read is bounded."""
    spec = {"sources": [{"name": "cam", "kind": "mjpeg", "url": "http://10.0.0.9/stream"}],
            "sinks": [{"name": "broker", "mqtt": {"host": "10.0.0.8"}}], "metricsPort": free_port()}
    kube = make_kube(spec)
    started = time.monotonic()
    reconcile(kube)
    assert time.monotonic() - started < 10
    cond = degraded(kube)
    assert cond["reason"] != "PipelineSourceUnreachable" and cond["reason"] != "PipelineSinkUnreachable"
