"""Fleet monitoring on the real server: confidence, class counts, drift and the hard-example spool."""

from __future__ import annotations

import json
import time

import models
import numpy as np
import pytest
from edgefleet_runtime.bench import Options, bench
from edgefleet_runtime.monitor import Window, probabilities, psi, read_example, read_reference
from prometheus_client.parser import text_string_to_metric_families

EVAL = models.REPO / "examples" / "quickstart" / "digits_eval.npz"


@pytest.fixture(scope="module")
def data():
    with np.load(EVAL) as z:
        return z["input"], z["y"]


@pytest.fixture(scope="module")
def reference_report(digits, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    path.write_text(json.dumps(bench(str(digits[0]), str(EVAL), opts=Options(threads_n=1, runs=5))))
    return str(path)


def _confidences(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return probabilities(logits).max(1)


def _infer(server, x: np.ndarray) -> None:
    payload = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    status, body = server.infer_json(payload)
    assert status == 200, body


def _metrics(server) -> dict:
    status, _, body = server.request("GET", "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def _noisy(x: np.ndarray, seed: int = 1) -> np.ndarray:
    return (x + np.random.default_rng(seed).normal(0, 0.5, x.shape)).astype(np.float32)


def test_confidence_class_counts_and_hard_examples(start_server, digits, data, tmp_path):
    x, _ = data
    clean, noisy = x[:60], _noisy(x[:60])
    spool = tmp_path / "spool"
    server = start_server(*digits, "--monitoring", "--uncertain-below", "0.9", "--hard-examples-dir", str(spool))
    for batch in (clean[:30], clean[30:], noisy[:20], noisy[20:]):
        _infer(server, batch)
    sent = np.concatenate([clean, noisy])
    conf = _confidences(digits[0], sent)
    low = conf < 0.9
    assert 0 < low.sum() < len(sent)  # the mix really has both kinds

    deadline = time.monotonic() + 10
    while len(list(spool.glob("*.npz"))) < low.sum() and time.monotonic() < deadline:
        time.sleep(0.05)
    m = _metrics(server)
    out = {"output": "logits"}
    assert _value(m, "edgefleet_runtime_prediction_confidence_count", **out) == len(sent)
    assert _value(m, "edgefleet_runtime_prediction_confidence_sum", **out) == pytest.approx(conf.sum(), rel=1e-5)
    assert _value(m, "edgefleet_runtime_prediction_confidence_bucket", le="0.9", **out) == (conf <= 0.9).sum()
    predicted = np.bincount(
        np.argmax(np.stack([probabilities(r[None])[0] for r in _logits(digits[0], sent)]), 1), minlength=10
    )
    for cls in range(10):
        got = m.get(("edgefleet_runtime_predictions_total", (("class", str(cls)), ("output", "logits"))), 0)
        assert got == predicted[cls], cls
    assert _value(m, "edgefleet_runtime_low_confidence_predictions_total") == low.sum()

    # exactly the unsure ones were spooled, with their inputs, outputs and the model's digest
    files = sorted(spool.glob("*.npz"))
    assert len(files) == low.sum() == _value(m, "edgefleet_runtime_hard_examples_stored")
    kept = []
    for f in files:
        inputs, outputs, meta = read_example(f)
        assert meta["digest"] == digits[1] and meta["confidence"] < 0.9
        assert outputs["logits"].shape == (1, 10)
        kept.append(inputs["input"][0])
    expected = sent[low]
    assert sorted(k.tobytes() for k in kept) == sorted(e.tobytes() for e in expected)


def _logits(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_spool_is_bounded_and_survives_a_restart(start_server, digits, data, tmp_path):
    x, _ = data
    noisy = _noisy(x[:40], seed=2)
    unsure = int((_confidences(digits[0], noisy) < 0.9).sum())
    assert unsure > 3
    spool = tmp_path / "spool"
    args = ("--uncertain-below", "0.9", "--hard-examples-dir", str(spool), "--hard-examples-max-count", "3")
    server = start_server(*digits, *args)
    _infer(server, noisy)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = _metrics(server)
        done = _value(m, "edgefleet_runtime_hard_examples_spooled_total")
        if done + _value(m, "edgefleet_runtime_hard_examples_dropped_total", reason="full") >= unsure:
            break
        time.sleep(0.05)
    assert len(list(spool.glob("*.npz"))) == 3 == done
    assert _value(m, "edgefleet_runtime_hard_examples_dropped_total", reason="full") == unsure - 3
    first = sorted(p.name for p in spool.glob("*.npz"))
    assert server.stop() == 0

    (spool / ".tmp-cut-short.npz").write_bytes(b"partial")  # a write a crash interrupted
    again = start_server(*digits, *args)
    m = _metrics(again)
    assert _value(m, "edgefleet_runtime_hard_examples_stored") == 3
    assert not (spool / ".tmp-cut-short.npz").exists()
    _infer(again, noisy[:10])
    time.sleep(0.3)
    assert sorted(p.name for p in spool.glob("*.npz")) == first  # full: nothing replaced, nothing added


def test_drift_turns_on_when_the_input_shifts(start_server, digits, data, reference_report):
    x, _ = data
    server = start_server(*digits, "--drift-reference", reference_report, "--drift-window", "200")
    _infer(server, x[:100])
    m = _metrics(server)
    assert _value(m, "edgefleet_runtime_drift_window_samples") == 100
    assert _value(m, "edgefleet_runtime_drifting") == 0  # not full yet
    _infer(server, x[100:200])
    m = _metrics(server)
    psis = {s: _value(m, "edgefleet_runtime_drift_psi", statistic=s) for s in ("classes", "confidence", "input")}
    assert max(psis.values()) < 0.2, psis  # evaluation-like traffic
    assert _value(m, "edgefleet_runtime_drifting") == 0
    for i in range(0, 200, 50):
        _infer(server, _noisy(x[200 + i : 250 + i], seed=i) + 0.5)
    m = _metrics(server)
    assert _value(m, "edgefleet_runtime_drift_psi", statistic="input") >= 0.2
    assert _value(m, "edgefleet_runtime_drifting") == 1


def test_monitoring_is_off_by_default(start_server, digits, data):
    server = start_server(*digits)
    _infer(server, data[0][:5])
    assert not any(k[0].startswith("edgefleet_runtime_prediction") for k in _metrics(server))


def test_bad_flags_are_named(start_server, digits, tmp_path):
    (tmp_path / "ref.json").write_text('{"kind": "something else"}')
    for args, needle in (
        (("--drift-reference", str(tmp_path / "ref.json")), "--drift-reference"),
        (("--monitoring", "--uncertain-below", "0"), "--uncertain-below"),
        (("--hard-examples-dir", str(tmp_path / "s"), "--hard-examples-sample-rate", "2"), "sample-rate"),
    ):
        s = start_server(*digits, *args, wait=False)
        assert s.proc.wait(20) == 2
        assert needle in s.logs()


def test_window_counts_match_a_recount():
    rng = np.random.default_rng(0)
    w = Window(50, 10, 4)
    history = []
    for _ in range(40):
        n = int(rng.integers(1, 30))
        bins = {"classes": rng.integers(0, 10, n), "confidence": rng.integers(0, 12, n), "input": rng.integers(0, 4, n)}
        w.add(bins)
        history.append(bins)
        last = {k: np.concatenate([h[k] for h in history])[-50:] for k in bins}
        for k, size in (("classes", 10), ("confidence", 12), ("input", 4)):
            assert (w.counts[k] == np.bincount(last[k], minlength=size)).all()
        assert w.filled == min(50, sum(len(h["classes"]) for h in history))


def test_psi_and_reference(tmp_path, reference_report):
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert psi([30, 20, 10], [10, 20, 30]) > 0.2
    ref = read_reference(reference_report)
    assert sum(ref["classes"]) == pytest.approx(1.0, abs=1e-4) and len(ref["input"]) == len(ref["inputEdges"]) + 1
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="--drift-reference .*not readable"):
        read_reference(str(tmp_path / "bad.json"))
    for broken, needle in (({**ref, "inputEdges": ["a"]}, "inputEdges must be a list of numbers"),
                           ({**ref, "input": [1.0]}, "one more bin than inputEdges"),
                           ({**ref, "confidence": [1.0]}, "confidence needs 12 bins")):
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=needle):
            read_reference(str(tmp_path / "broken.json"))
