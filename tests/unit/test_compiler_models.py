"""The compiler on the real fixture models, for every built-in profile, asserting the reports."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from edgefleet.artifacts import LocalStore
from edgefleet.compiler import (
    AccuracyBudget,
    CompileRequest,
    CompileTarget,
    Policy,
    compile_model,
    load_profiles,
    tflite_convert,
)

M = Path(__file__).resolve().parent.parent / "fixtures" / "models"
RUNS = 5  # timing iterations: keep the suite fast; the benchmark measures properly
CPU = CompileTarget(format="onnx", precision="int8", runtime="onnxruntime", execution_provider="cpu")
LITERT = CompileTarget(format="tflite", precision="int8", runtime="litert")
OPENVINO = CompileTarget(format="openvino", precision="int8", runtime="openvino")


def digits_policy(**kw) -> Policy:
    kw.setdefault("timingRuns", RUNS)
    return Policy(calibration=M / "digits_calib.npz", evaluation=M / "digits_eval.npz", **kw)


@pytest.fixture(scope="module")
def digits_all(tmp_path_factory):
    """digits CNN compiled for every built-in profile, published to a local store (built once)."""
    root = tmp_path_factory.mktemp("digits")
    store = LocalStore(root / "store")
    req = CompileRequest(str(M / "digits_cnn.onnx"), load_profiles(None), digits_policy())
    return req, compile_model(req, store, root / "cache"), store, root


def test_every_builtin_profile_gets_a_report(digits_all):
    req, result, _, _ = digits_all
    assert set(result.variants) == set(req.targets)
    assert result.sourceFormat == "onnx" and result.sourceDigest.startswith("sha256:")
    for name, v in result.variants.items():
        status = v.to_status()
        assert set(status) == {"profile", "format", "precision", "quantization", "artifact", "digest", "sizeBytes",
                               "latencyP50Ms", "accuracyDelta", "state", "reason", "message", "candidates"}
        assert status["profile"] == name and status["state"] in ("Ready", "Failed")
        if v.state == "Failed":
            assert v.reason and v.message, name
            assert v.artifact is None and v.digest is None
    # a CPU int8 profile always compiles
    assert any(v.state == "Ready" and v.target.precision == "int8" for v in result.variants.values())


def test_cpu_int8_choice_is_smaller_faster_and_inside_budget(digits_all):
    _, result, store, _ = digits_all
    cpu = [v for v in result.variants.values() if v.target.runtime == "onnxruntime"
           and v.target.execution_provider in (None, "cpu") and v.target.precision == "int8"]
    assert cpu, "no CPU int8 profile among the built-ins"
    for v in cpu:
        assert v.state == "Ready", v.message
        assert v.precision == "int8"
        assert v.sizeBytes * 3.5 <= result.sourceSizeBytes
        fp32 = next(c for c in v.candidates if c.name == "fp32")
        assert v.latency.p50Ms1 < fp32.latency.p50Ms1
        assert v.metrics.accuracyDelta >= -1.0 and v.metrics.accuracy > 0.95
        assert {c.state for c in v.candidates} <= {"Chosen", "Lost", "Failed"}
        assert sum(c.state == "Chosen" for c in v.candidates) == 1
        assert all(c.why for c in v.candidates if c.state != "Chosen")
        # the published bytes are the reported digest
        assert store.get(v.artifact, v.digest)[:1]
        assert v.loadSeconds is not None and v.latency.p95Ms1 >= v.latency.p50Ms1


def test_unreachable_targets_say_why(digits_all):
    _, result, _, _ = digits_all
    for v in result.variants.values():
        if v.target.format == "tflite" and tflite_convert.missing():
            assert v.state == "Failed" and v.reason == "ConversionUnavailable"
            assert "edgefleet[tflite-convert]" in v.message
        elif v.target.format == "tflite":  # onnx2tf installed: converted, and the CPU stand-in is said
            assert v.state == "Ready" and "edgetpu_compiler" in v.message, v.message
        if v.target.execution_provider in ("cuda", "tensorrt") and v.state == "Ready":
            assert "stand-in" in v.message


def test_cache_hit_does_no_work(digits_all):
    req, first, store, root = digits_all
    again = compile_model(req, store, root / "cache")
    assert again.cacheHit and again.workDone == 0
    assert all(v.cacheHit for v in again.variants.values())
    assert {k: v.digest for k, v in again.variants.items()} == {k: v.digest for k, v in first.variants.items()}


def test_digests_stable_across_two_runs(tmp_path):
    req = CompileRequest(str(M / "digits_cnn.onnx"), {"cpu": CPU}, digits_policy())
    a = compile_model(req, None, tmp_path / "c1")
    b = compile_model(req, None, tmp_path / "c2")
    assert b.workDone > 0 and not b.cacheHit
    da = {c.name: c.sha256 for c in a.variants["cpu"].candidates}
    db = {c.name: c.sha256 for c in b.variants["cpu"].candidates}
    assert da == db and len(set(da.values())) == len(da)


def test_impossible_budget_publishes_nothing(tmp_path):
    store = LocalStore(tmp_path / "store")
    req = CompileRequest(str(M / "digits_cnn.onnx"), {"cpu": CPU},
                         digits_policy(sparsity=0.9, accuracyBudget=AccuracyBudget(max_accuracy_drop=0.0)))
    r = compile_model(req, store, tmp_path / "cache")
    v = r.variants["cpu"]
    assert v.state == "Failed" and v.reason == "AccuracyBudgetExceeded"
    assert "maxAccuracyDrop 0.0" in v.message and all(c.state == "Lost" for c in v.candidates)
    assert store.digests() == [] and v.to_status()["artifact"] is None


def test_pruning_really_shrinks_storage(tmp_path):
    req = CompileRequest(str(M / "digits_cnn.onnx"), {"cpu": CPU.model_copy(update={"precision": "fp32"})},
                         digits_policy(sparsity=0.3))
    v = compile_model(req, LocalStore(tmp_path / "s"), tmp_path / "c").variants["cpu"]
    assert v.state == "Ready", v.message
    assert v.chosen == "pruned30-fp32" and v.mediaType.endswith("+gzip")
    raw = LocalStore(tmp_path / "s").get(v.artifact, v.digest)
    assert len(gzip.decompress(raw)) > 1.3 * v.sizeBytes  # storage really shrinks
    assert v.metrics.accuracyDelta >= -1.0


def test_transformer_encoder_int8(tmp_path):
    req = CompileRequest(str(M / "tiny_encoder.onnx"), {"cpu": CPU},
                         Policy(calibration=M / "encoder_calib.npz", evaluation=M / "encoder_eval.npz",
                                accuracyBudget=AccuracyBudget(min_cosine=0.99), timingRuns=RUNS))
    v = compile_model(req, None, tmp_path).variants["cpu"]
    assert v.state == "Ready" and v.precision == "int8", v.message
    assert v.metrics.cosine >= 0.99 and v.metrics.accuracy is None
    assert v.sizeBytes * 3.5 < v.sourceSizeBytes


def test_tflite_palm_detector_in_litert(tmp_path):
    tpu = LITERT.model_copy(update={"delegate": "libedgetpu.so.1"})
    req = CompileRequest(str(M / "palm_detection_lite.tflite"), {"pi": LITERT, "tpu": tpu},
                         Policy(evaluation=M / "palm_eval.npz", timingRuns=2))
    r = compile_model(req, None, tmp_path)
    assert r.sourceFormat == "tflite"
    pi = r.variants["pi"]
    assert pi.state == "Ready" and pi.chosen == "source" and pi.precision == "fp16", pi.message
    why = {c.name: (c.reason, c.why) for c in pi.candidates}
    assert why["litert-dynamic-int8"][0] == "NothingQuantized"
    assert r.variants["tpu"].state == "Failed" and r.variants["tpu"].reason == "ToolchainUnavailable"


def test_openvino_target(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    req = CompileRequest(str(M / "digits_cnn.onnx"), {"ov": OPENVINO},
                         digits_policy())
    v = compile_model(req, None, tmp_path).variants["ov"]
    assert v.state == "Ready", v.message
    assert {c.name for c in v.candidates} == {"openvino-fp32", "openvino-int8"}
