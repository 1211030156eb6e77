"""``edgefleet-runtime bench`` on the quickstart model: real backends, real numbers, JSON out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import models
import numpy as np
import pytest
from edgefleet_runtime.bench import BenchError, Options, bench, candidate_files

QUICKSTART = models.REPO / "examples" / "quickstart"
MODEL = QUICKSTART / "digits_cnn.onnx"
EVAL = QUICKSTART / "digits_eval.npz"
FAST = Options(threads_n=2, runs=20)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet_runtime.cli", "bench", *args], capture_output=True, text=True, timeout=300
    )


def _expected_accuracy(model: Path) -> float:
    import onnxruntime as ort

    with np.load(EVAL) as z:
        x, y = z["input"], z["y"]
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> Path:
    """The reference again (deduplicated), other weights (wrong answers), dynamic int8 and a broken file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = tmp_path_factory.mktemp("candidates")
    shutil.copyfile(MODEL, d / "fp32.onnx")
    shutil.copyfile(models.digits_onnx(d / "src", variant=1), d / "other-weights.onnx")
    quantize_dynamic(str(MODEL), str(d / "int8.onnx"), weight_type=QuantType.QInt8)
    (d / "broken.onnx").write_bytes(b"not a model at all")
    (d / "fp32.onnx.sig").write_text("ignored")
    shutil.rmtree(d / "src")
    return d


def test_cli_measures_the_quickstart_model(tmp_path):
    out = tmp_path / "report.json"
    proc = _cli("--model", str(MODEL), "--eval", str(EVAL), "--threads", "2", "--runs", "20", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["kind"] == "BenchReport" and report["threadsN"] == 2 and report["reference"] == MODEL.name
    (r,) = report["results"]
    assert r["digest"] == models.sha256(MODEL) and r["sizeBytes"] == MODEL.stat().st_size
    assert r["backend"] == "onnxruntime" and r["samples"] == 450
    assert r["accuracy"] == pytest.approx(_expected_accuracy(MODEL), abs=1e-6)
    assert r["agreement"] == 1.0 and r["cosine"] == pytest.approx(1.0)
    for key in ("loadSeconds", "p50Ms1", "p95Ms1", "p50MsN", "p95MsN", "throughputPerSecond"):
        assert r[key] > 0, key
    assert r["p50Ms1"] <= r["p95Ms1"] and r["p50MsN"] <= r["p95MsN"]
    # the child's own high-water mark: above what it held before opening the model
    assert r["peakRssBytes"] > r["rssBeforeLoadBytes"] > 0
    assert report["fastest"] == MODEL.name


def test_candidates_are_measured_compared_and_ranked(candidates):
    names = [f.name for f in candidate_files(candidates)]
    assert "fp32.onnx.sig" not in names and "broken.onnx" in names
    report = bench(str(MODEL), str(EVAL), str(candidates), FAST, max_accuracy_drop=1.0)
    by = {r["name"]: r for r in report["results"]}
    assert "fp32.onnx" not in by  # same digest as --model: measured once
    assert set(by) == {MODEL.name, "other-weights.onnx", "int8.onnx", "broken.onnx"}
    assert "onnxruntime cannot load" in by["broken.onnx"]["error"]
    other = by["other-weights.onnx"]
    assert other["accuracy"] == pytest.approx(_expected_accuracy(candidates / "other-weights.onnx"), abs=1e-6)
    assert other["agreement"] < 0.5 and other["accuracyDelta"] < -1.0
    assert by["int8.onnx"]["agreement"] > 0.9
    # fastest: never the broken one nor the one outside the accuracy budget
    inside = [r for r in report["results"] if "error" not in r and r.get("accuracyDelta", 0) >= -1.0]
    assert report["fastest"] == min(inside, key=lambda r: r["p50MsN"])["name"]
    assert report["fastest"] != "other-weights.onnx"


def test_cli_exit_codes(candidates, tmp_path):
    proc = _cli("--model", str(MODEL), "--eval", str(EVAL), "--candidates", str(candidates), "--runs", "5",
                "--threads", "1", "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 1 and "broken.onnx" in proc.stderr  # a candidate failed, the others are reported
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 4
    proc = _cli("--model", str(tmp_path / "missing.onnx"), "--eval", str(EVAL))
    assert proc.returncode == 2 and "--model" in proc.stderr
    proc = _cli("--model", str(candidates / "broken.onnx"), "--eval", str(EVAL), "--runs", "5")
    assert proc.returncode == 4
    wrong = tmp_path / "int.npz"
    np.savez(wrong, input=np.zeros((4, 1, 8, 8), np.int64))
    proc = _cli("--model", str(MODEL), "--eval", str(wrong), "--runs", "5")
    assert proc.returncode == 2 and "astype(numpy.float32)" in proc.stderr


def test_bad_evaluation_data_is_named(tmp_path):
    with pytest.raises(BenchError, match="--eval .*no such file"):
        bench(str(MODEL), str(tmp_path / "nope.npz"), opts=FAST)
    wrong = tmp_path / "int.npz"
    np.savez(wrong, input=np.zeros((4, 1, 8, 8), np.int64), y=np.zeros(4, np.int64))
    report = bench(str(MODEL), str(wrong), opts=FAST)
    assert "astype(numpy.float32)" in report["results"][0]["error"]
    shape = tmp_path / "shape.npz"
    np.savez(shape, input=np.zeros((4, 8, 8), np.float32))
    assert "has shape [4, 8, 8]" in bench(str(MODEL), str(shape), opts=FAST)["results"][0]["error"]
    with pytest.raises(BenchError, match="--candidates"):
        bench(str(MODEL), str(EVAL), str(tmp_path / "none"), FAST)
