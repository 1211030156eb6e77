"""Every bad input: non-zero exit, a message with the cause and the fix, nothing published."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from edgefleet.compiler import CompileError, CompileRequest, CompileTarget, Policy, compile_model, load_profiles
from edgefleet.compiler.cli import compile_command

M = Path(__file__).resolve().parent.parent / "fixtures" / "models"
DIGITS = M / "digits_cnn.onnx"
OPENVINO = CompileTarget(format="openvino", precision="int8", runtime="openvino")


def run(tmp_path, *args):
    out = tmp_path / "out"
    res = CliRunner().invoke(compile_command, [*map(str, args), "--out", str(out), "--cache-dir",
                                               str(tmp_path / "cache"), "--timing-runs", "2", "--quiet"])
    published = list((out / "sha256").iterdir()) if (out / "sha256").exists() else []
    return res, published


def assert_refused(res, published, reason, *words):
    text = res.output
    assert res.exit_code == 2, text
    assert f"error: {reason}" in text and "fix:" in text, text
    for w in words:
        assert w in text, text
    assert published == []


def test_truncated_model(tmp_path):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(DIGITS.read_bytes()[:5000])
    assert_refused(*run(tmp_path, bad, "--profile", "cpu-amd64"), "InvalidModel", "truncated")


def test_corrupt_tflite(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes((M / "palm_detection_lite.tflite").read_bytes()[:4096])
    res, pub = run(tmp_path, bad, "--profile", "cpu-amd64")
    assert_refused(res, pub, "InvalidModel")


def test_digest_mismatch(tmp_path):
    assert_refused(*run(tmp_path, DIGITS, "--profile", "cpu-amd64", "--digest", "sha256:" + "0" * 64),
                   "DigestMismatch", hashlib.sha256(DIGITS.read_bytes()).hexdigest())


def test_matching_digest_is_accepted(tmp_path):
    d = "sha256:" + hashlib.sha256(DIGITS.read_bytes()).hexdigest()
    res, pub = run(tmp_path, DIGITS, "--profile", "cpu-amd64", "--quantization", "none", "--digest", d)
    assert res.exit_code == 0, res.output
    assert len([p for p in pub if not p.name.endswith(".json")]) == 1


def test_unsupported_opset(tmp_path):
    m = onnx.load(str(DIGITS))
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    bad = tmp_path / "future.onnx"
    onnx.save(m, str(bad))
    assert_refused(*run(tmp_path, bad, "--profile", "cpu-amd64"), "UnsupportedOpset", "opset")


def test_unknown_operator(tmp_path):
    m = onnx.load(str(DIGITS))
    m.graph.node[1].op_type = "NotARealOp"
    bad = tmp_path / "op.onnx"
    onnx.save(m, str(bad))
    assert_refused(*run(tmp_path, bad, "--profile", "cpu-amd64"), "UnsupportedOperator", "NotARealOp")


@pytest.mark.parametrize("array, words", [
    (np.zeros((10, 1, 9, 9), np.float32), ["shape", "[10, 1, 9, 9]"]),
    (np.zeros((10, 1, 8, 8), np.float64), ["float64", "astype"]),
    (np.zeros((10, 64), np.float32), ["shape"]),
])
def test_calibration_wrong_shape_or_dtype(tmp_path, array, words):
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=array)
    assert_refused(*run(tmp_path, DIGITS, "--profile", "cpu-amd64", "--calibration", cal), "InvalidData", *words)


def test_missing_optional_extra(tmp_path, monkeypatch):
    import edgefleet.compiler.core as core

    monkeypatch.setattr(core, "_has", lambda mod: mod not in ("openvino", "nncf"))
    r = compile_model(CompileRequest(str(DIGITS), {"ov": OPENVINO},
                                     Policy(timingRuns=2)), None, tmp_path)
    v = r.variants["ov"]
    assert v.state == "Failed" and v.reason == "MissingExtra" and "pip install 'edgefleet[openvino]'" in v.message


def test_variant_failure_exit_code(tmp_path):
    """A profile whose variant cannot be built (the Core ML export makes no int8): exit 1, nothing published."""
    prof = tmp_path / "p.yaml"
    prof.write_text("apiVersion: edgefleet.io/v1alpha1\nkind: HardwareProfile\nmetadata: {name: mac}\n"
                    "spec:\n  target: {format: coreml, precision: int8, runtime: coreml}\n")
    res, pub = run(tmp_path, DIGITS, "--profiles-file", prof, "--profile", "mac", "--quantization", "dynamic-int8")
    assert res.exit_code == 1 and "PrecisionNotSupported" in res.output and pub == []


def test_unknown_profile(tmp_path):
    assert_refused(*run(tmp_path, DIGITS, "--profile", "nope"), "InvalidRequest", "nope")


def test_missing_source(tmp_path):
    assert_refused(*run(tmp_path, tmp_path / "none.onnx", "--profile", "cpu-amd64"), "SourceUnavailable")


def test_static_without_calibration_is_refused(tmp_path):
    with pytest.raises(CompileError) as e:
        onnx = CompileTarget(format="onnx", precision="int8", runtime="onnxruntime")
        compile_model(CompileRequest(str(DIGITS), {"c": onnx},
                                       Policy(quantization="static-int8")),
                      None, tmp_path)
    assert e.value.reason == "InvalidRequest" and "--calibration" in e.value.fix


def test_load_profiles_builtin_and_file(tmp_path):
    builtin = load_profiles(None)
    assert builtin and all(t.format and t.runtime for t in builtin.values())
    f = tmp_path / "x.yaml"
    f.write_text("kind: List\nitems:\n- kind: HardwareProfile\n  metadata: {name: a}\n  spec:\n"
                 "    target: {format: onnx, precision: fp16, runtime: onnxruntime, executionProvider: cuda}\n")
    cuda = CompileTarget(format="onnx", precision="fp16", runtime="onnxruntime", execution_provider="cuda")
    assert load_profiles(f) == {"a": cuda}
