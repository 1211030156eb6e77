"""The chart's fleet monitoring (helm template): PodMonitor, Grafana dashboard and PrometheusRule, off by default,
querying only metrics the runtime really exports, on the labels the renderer really puts on runtime pods."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_chart import by_kind, helm, render, template  # noqa: F401 (helm is a fixture)

ALL_ON = ("--set", "monitoring.podMonitor.enabled=true", "--set", "monitoring.dashboard.enabled=true",
          "--set", "monitoring.prometheusRule.enabled=true")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every sample name a runtime with monitoring, drift, a spool and an uploader exports."""
    from edgefleet_runtime.feedback import Uploader
    from edgefleet_runtime.monitor import HardExamples, Monitor
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    spool = HardExamples(str(tmp_path_factory.mktemp("spool")))
    ref = {"classes": [0.5, 0.5], "confidence": [1 / 12] * 12, "inputEdges": [0.0], "input": [0.5, 0.5]}
    monitor = Monitor(reference=ref, hard_examples=spool)
    registry = CollectorRegistry()
    registry.register(monitor)
    registry.register(Uploader(spool, "oci://127.0.0.1:1/x", {}))

    class Model:
        name, digest = "m", "sha256:" + "0" * 64

        class backend:  # noqa: N801
            outputs = [type("T", (), {"name": "out"})]

    monitor.observe(Model, {"x": np.zeros((1, 2), np.float32)}, {"out": np.array([[0.7, 0.3]], np.float32)})
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"edgefleet_runtime_\w+", expr))


def test_off_by_default(helm):  # noqa: F811
    kinds = {d["kind"] for d in render(helm)}
    assert not kinds & {"PodMonitor", "PrometheusRule"}
    assert not [c for c in by_kind(render(helm), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


def test_pod_monitor_selects_the_runtime_pods_the_renderer_makes(helm):  # noqa: F811
    from edgefleet.render.workload import child_labels

    (pm,) = by_kind(render(helm, *ALL_ON, "--set", "monitoring.podMonitor.labels.release=prom"), "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "prom"
    assert pm["spec"]["selector"]["matchLabels"].items() <= child_labels("digits", "cpu-arm64").items()
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert set(pm["spec"]["podTargetLabels"]) == {"edgefleet.io/deployment", "edgefleet.io/profile"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"  # the runtime container's port name


def test_dashboard_queries_only_exported_metrics(helm, exported):  # noqa: F811
    (cm,) = [c for c in by_kind(render(helm, *ALL_ON), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["edgefleet-fleet-monitoring.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= exported, used - exported
    for metric in ("edgefleet_runtime_drift_psi", "edgefleet_runtime_prediction_confidence_bucket",
                   "edgefleet_runtime_hard_examples_uploaded_total"):
        assert metric in used


def test_prometheus_rule_alerts(helm, exported):  # noqa: F811
    docs = render(helm, *ALL_ON, "--set", "monitoring.prometheusRule.for=5m",
                  "--set-json", "monitoring.prometheusRule.lowConfidenceRatio=0.4")
    (rule,) = by_kind(docs, "PrometheusRule")
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == {"EdgefleetModelDrifting", "EdgefleetLowConfidence", "EdgefleetHardExamplesNotUploaded",
                          "EdgefleetHardExamplesDropped"}
    assert rules["EdgefleetModelDrifting"]["for"] == "5m"
    assert "> 0.4" in rules["EdgefleetLowConfidence"]["expr"]
    assert "{{ $labels.edgefleet_io_profile }}" in rules["EdgefleetModelDrifting"]["annotations"]["summary"]
    for r in rules.values():
        assert metric_names(r["expr"]) <= exported, r["alert"]


@pytest.mark.parametrize("bad", ["monitoring.prometheusRule.lowConfidenceRatio=2", "monitoring.dashboard.foo=1",
                                 "monitoring.podMonitor.interval=soon"])
def test_schema_rejects_bad_values(helm, bad):  # noqa: F811
    proc = template(helm, "--set", bad, check=False)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
