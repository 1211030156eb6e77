"""Shadow traffic: the served model answers every client; a sample of requests also runs on the candidate named in
the control folder's `shadow` file, and its agreement with the served model is exported as Prometheus metrics."""

from __future__ import annotations

import json
import time

import models
import numpy as np
import pytest
from edgefleet_runtime.shadow import compare
from prometheus_client.parser import text_string_to_metric_families
from test_switch import _cache, _write

EVAL = np.load(models.QUICKSTART / "digits_eval.npz")["input"]
BATCH, REQUESTS = 4, 25


def _body(i: int) -> dict:
    x = EVAL[i * BATCH:(i + 1) * BATCH]
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def _samples(server, name: str) -> dict[tuple, float]:
    text = server.request("GET", "/metrics")[2].decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _value(server, name: str, **labels) -> float:
    return _samples(server, name).get(tuple(sorted(labels.items())), 0.0)


def _serve_with_shadow(tmp_path, start_server, candidate, rate: float):
    base = models.head_update(tmp_path / "models")[0]
    cache, (d0, dc) = _cache(tmp_path, base, candidate)
    control = tmp_path / "control"
    control.mkdir()
    _write(control / "active", d0)
    _write(control / "shadow", json.dumps({"digest": dc, "sampleRate": rate}))
    server = start_server(cache / "sha256" / d0[7:], d0, "--cache", str(cache), "--control-dir", str(control))
    deadline = time.monotonic() + 20
    while _value(server, "edgefleet_runtime_control", kind="shadow", digest=dc, state="done") != 1.0:
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.1)
    return server, base, dc


def _ask_all(server, base) -> None:
    """Every client answer is the served model's, whatever the candidate says."""
    for i in range(REQUESTS):
        status, out = server.infer_json(_body(i))
        assert status == 200
        got = np.array(out["outputs"][0]["data"], np.float32).reshape(BATCH, -1)
        np.testing.assert_allclose(got, models.reference_outputs(base, EVAL[i * BATCH:(i + 1) * BATCH]),
                                   rtol=1e-5, atol=1e-5)


def _wait_samples(server, dc, want: int) -> None:
    deadline = time.monotonic() + 20
    while _value(server, "edgefleet_runtime_shadow_samples_total", candidate=dc, output="logits") < want:
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["disagreeing", "fine-tuned"])
def test_shadow_clients_get_only_the_served_answers_and_agreement_is_exported(tmp_path, start_server, kind):
    candidate = (models.swapped_classes(tmp_path / "cand") if kind == "disagreeing"
                 else models.head_update(tmp_path / "cand", epochs=1)[1])
    server, base, dc = _serve_with_shadow(tmp_path, start_server, candidate, 1.0)
    _ask_all(server, base)
    n = REQUESTS * BATCH
    _wait_samples(server, dc, n)
    x = EVAL[:n]
    samples, top1, cosine = compare(models.reference_outputs(base, x), models.reference_outputs(candidate, x))
    agree = _value(server, "edgefleet_runtime_shadow_top1_agree_total", candidate=dc, output="logits")
    ratio = _value(server, "edgefleet_runtime_shadow_agreement", candidate=dc, output="logits", kind="top1")
    print(f"\nshadow {kind}: top-1 agreement {agree:.0f}/{n} = {ratio:.3f}, expected {top1}/{samples}")
    assert samples == n and agree == top1 and ratio == pytest.approx(top1 / n)
    assert _value(server, "edgefleet_runtime_shadow_cosine_sum_total", candidate=dc, output="logits") == \
        pytest.approx(cosine, rel=1e-4)
    if kind == "disagreeing":
        assert ratio < 0.2
    else:
        assert ratio > 0.95


def test_shadow_sample_rate_zero_mirrors_nothing_and_a_bad_rate_is_named(tmp_path, start_server):
    server, base, dc = _serve_with_shadow(tmp_path, start_server, models.swapped_classes(tmp_path / "c"), 0.0)
    _ask_all(server, base)
    time.sleep(0.5)
    assert _value(server, "edgefleet_runtime_shadow_samples_total", candidate=dc, output="logits") == 0
    _write(tmp_path / "control" / "shadow", json.dumps({"digest": dc, "sampleRate": 3}))
    deadline = time.monotonic() + 10
    while "sampleRate 3.0 must be between 0 and 1" not in server.logs():
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.1)


def test_shadow_compare_counts_top1_and_cosine_per_sample():
    a = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    b = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert compare(a, b) == (2, 1, pytest.approx(1.0))
    assert compare(np.array([[3.0], [1.0]]), np.array([[3.0], [-1.0]])) == (2, None, pytest.approx(0.0))
    assert compare(a, b[:, :2]) == (2, 0, 0.0)  # another shape agrees on nothing
