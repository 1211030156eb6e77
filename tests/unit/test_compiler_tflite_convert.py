"""ONNX -> .tflite with onnx2tf + TensorFlow (compiler/tflite_convert.py).

The conversion tests need the ``tflite-convert`` extra (TensorFlow, ~1.9 GB) and skip without it; the
rest (planning, errors, the layout and renaming helpers) run everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from edgefleet.compiler import CompileRequest, CompileTarget, Policy, compile_model, load_profiles, tflite_convert
from onnx import TensorProto, helper

M = Path(__file__).resolve().parent.parent / "fixtures" / "models"
DIGITS = M / "digits_cnn.onnx"
CORAL = load_profiles(None)["coral-edgetpu"]
PI_TFLITE = CompileTarget(format="tflite", precision="int8", runtime="litert")
WHY = tflite_convert.missing()
needs_onnx2tf = pytest.mark.skipif(WHY is not None, reason=f"{WHY}")


def digits_policy(**kw) -> Policy:
    kw.setdefault("timingRuns", 5)
    return Policy(calibration=M / "digits_calib.npz", evaluation=M / "digits_eval.npz", **kw)


def interpreter(data: bytes):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    it.allocate_tensors()
    return it


# ----------------------------------------------------------------------------- everywhere
def test_without_the_extra_the_variant_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tflite_convert, "NEEDS", ("edgefleet_no_such_module", "ai_edge_litert"))
    v = compile_model(CompileRequest(str(DIGITS), {"coral": CORAL}, digits_policy()), None, tmp_path).variants["coral"]
    assert v.state == "Failed" and v.reason == "ConversionUnavailable"
    assert "edgefleet_no_such_module" in v.message and "edgefleet[tflite-convert]" in v.message
    assert "compiler image" in v.message


def test_coral_without_calibration_fails_before_converting(tmp_path, monkeypatch):
    monkeypatch.setattr(tflite_convert, "NEEDS", ())  # as if installed: the check comes before any child runs

    def no_child(*_a, **_k):
        raise AssertionError("no conversion may start without calibration data")

    monkeypatch.setattr(tflite_convert, "_run_child", no_child)
    v = compile_model(CompileRequest(str(DIGITS), {"coral": CORAL},
                                     Policy(evaluation=M / "digits_eval.npz", timingRuns=2)), None, tmp_path
                      ).variants["coral"]
    assert v.state == "Failed" and v.reason == "NoCalibrationData", v.message
    assert "--calibration" in v.message
    assert [c.name for c in v.candidates] == ["litert-static-int8"]  # the Edge TPU runs only full int8


def test_plan_per_target():
    assert tflite_convert.flavours(["static-int8", "dynamic-int8", "fp16", "none"], None) == [
        "static-int8", "dynamic-int8", "none"]
    assert tflite_convert.flavours(["static-int8", "dynamic-int8", "fp16", "none"], "libedgetpu.so.1") == [
        "static-int8"]
    assert tflite_convert.flavours(["fp16"], None) == []


def test_fp16_only_is_refused_with_the_choices(tmp_path, monkeypatch):
    monkeypatch.setattr(tflite_convert, "NEEDS", ())
    v = compile_model(CompileRequest(str(DIGITS), {"p": PI_TFLITE.model_copy(update={"precision": "fp16"})},
                                     digits_policy(quantization="fp16")), None, tmp_path).variants["p"]
    assert v.state == "Failed" and v.reason == "PrecisionNotSupported"
    assert "dynamic-/static-int8" in v.message and "fp16" in v.message


def test_nchw_perm():
    assert tflite_convert.nchw_perm([None, 10], [None, 10]) is None
    assert tflite_convert.nchw_perm([1, 8, 8, 4], [None, 4, 8, 8]) == [0, 3, 1, 2]
    assert tflite_convert.nchw_perm([1, 16, 4], [1, 4, 16]) == [0, 2, 1]
    assert tflite_convert.nchw_perm([1, 4, 4, 4], [1, 4, 4, 4]) is None  # ambiguous square: as converted
    with pytest.raises(ValueError, match="does not match the ONNX shape"):
        tflite_convert.nchw_perm([1, 5, 7], [1, 6, 7])


def test_rename_io_renames_tensors_the_runtime_reads():
    pytest.importorskip("ai_edge_litert")
    palm = (M / "palm_detection_lite.tflite").read_bytes()
    before = interpreter(palm)
    old_in = before.get_input_details()[0]["name"]
    old_out = [d["name"] for d in before.get_output_details()]
    renamed = tflite_convert.rename_io(palm, {old_in: "image", old_out[0]: "boxes"})
    after = interpreter(renamed)
    assert after.get_input_details()[0]["name"] == "image"
    assert [d["name"] for d in after.get_output_details()] == ["boxes", *old_out[1:]]
    x = np.random.default_rng(0).random(before.get_input_details()[0]["shape"]).astype(np.float32)
    outs = []
    for it in (before, after):
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(*outs)  # same model, new names


def test_flex_ops_are_named_as_such():
    e = tflite_convert._error("ConverterError: Some ops are not supported by the native TFLite runtime: Erfinv")
    assert e.reason == "UnsupportedOperator" and "Erfinv" in e.message and "ONNX" in e.fix
    e = tflite_convert._error("ConverterError: error: 'tf.MatrixDeterminant' op is neither a custom op nor a flex op"
                              " note: ... 'tf.MatrixDeterminant' op is neither a custom op nor a flex op")
    assert e.reason == "UnsupportedOperator" and e.message.endswith("no kernel for: MatrixDeterminant")
    e = tflite_convert._error("onnx2tf: SystemExit: 1", 1)
    assert e.reason == "PassFailed" and "exit 1" in e.message and e.fix


# ----------------------------------------------------------------------------- with onnx2tf + TensorFlow
@pytest.fixture(scope="module")
def coral(tmp_path_factory):
    root = tmp_path_factory.mktemp("coral")
    req = CompileRequest(str(DIGITS), {"coral-edgetpu": CORAL}, digits_policy())
    return compile_model(req, None, root / "cache")


@needs_onnx2tf
def test_coral_variant_is_full_int8_inside_the_budget(coral):
    v = coral.variants["coral-edgetpu"]
    assert v.state == "Ready", v.message
    assert (v.format, v.precision, v.quantization, v.chosen) == ("tflite", "int8", "static-int8",
                                                                  "litert-static-int8")
    assert v.metrics.accuracyDelta >= -1.0 and v.metrics.agreement >= 0.98, v.metrics
    assert v.sizeBytes * 3 < coral.sourceSizeBytes and v.sizeBytes <= 8 * 2**20  # the profile's maxModelSizeBytes
    assert "edgetpu_compiler" in v.message  # measured on CPU, and says so
    data = Path(v.artifact.removeprefix("file://")).read_bytes()
    it = interpreter(data)
    (i,), (o,) = it.get_input_details(), it.get_output_details()
    assert (i["name"], list(i["shape_signature"]), i["dtype"]) == ("input", [-1, 1, 8, 8], np.int8)  # NCHW kept
    assert (o["name"], list(o["shape_signature"]), o["dtype"]) == ("logits", [-1, 10], np.int8)
    assert i["quantization"][0] > 0 and o["quantization"][0] > 0
    from edgefleet.compiler.litert import list_ops

    builtin, custom = list_ops(data)
    assert custom == [] and "DEQUANTIZE" not in builtin and "QUANTIZE" not in builtin  # int8 end to end


@needs_onnx2tf
def test_coral_variant_served_by_the_runtime_backend(coral):
    """edgefleet_runtime's LiteRT backend takes the same NCHW float batch the ONNX model takes."""
    import onnxruntime as ort
    from edgefleet_runtime.backends import open_backend

    v = coral.variants["coral-edgetpu"]
    ev = np.load(M / "digits_eval.npz")
    x, y = ev["input"], ev["y"]
    ref = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    backend = open_backend(v.artifact.removeprefix("file://"), backend="litert")
    assert [(t.name, t.datatype) for t in backend.inputs] == [("input", "FP32")]
    got = backend.run({"input": x}, ["logits"])["logits"]  # the whole eval set as one batch
    assert got.shape == ref.shape
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    assert agreement >= v.metrics.agreement - 1e-6 and agreement >= 0.98
    assert float((got.argmax(1) == y).mean()) >= v.metrics.accuracy - 1e-6


@needs_onnx2tf
def test_generic_tflite_int8_target_builds_three_candidates(tmp_path, coral):
    v = compile_model(CompileRequest(str(DIGITS), {"pi": PI_TFLITE}, digits_policy()), None, tmp_path).variants["pi"]
    assert v.state == "Ready", v.message
    by = {c.name: c for c in v.candidates}
    assert set(by) == {"litert-static-int8", "litert-dynamic-int8", "litert-fp32"}
    assert all(c.state != "Failed" for c in by.values()), [(c.name, c.why) for c in by.values()]
    fp32 = by["litert-fp32"].metrics
    assert fp32.agreement == 1.0 and fp32.maxAbsDiff < 1e-3, fp32  # same numbers as ONNX: layout handled
    assert by["litert-dynamic-int8"].sizeBytes * 3 < by["litert-fp32"].sizeBytes
    # reproducible: another session's conversion of the same model and data gives the same bytes
    assert by["litert-static-int8"].sha256 == coral.variants["coral-edgetpu"].digest


def _conv_model(path: Path) -> None:
    """NCHW in, NCHW out (a 4-D output that onnx2tf would leave channels-last)."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 10])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@needs_onnx2tf
def test_four_d_outputs_come_back_nchw(tmp_path):
    import onnxruntime as ort

    src = tmp_path / "conv.onnx"
    _conv_model(src)
    data = tflite_convert.build(src.read_bytes(), "none", None, tmp_path / "work")
    it = interpreter(data)
    assert list(it.get_output_details()[0]["shape_signature"]) == [-1, 4, 6, 10]
    x = np.random.default_rng(1).random((2, 3, 6, 10)).astype(np.float32)
    it.resize_tensor_input(it.get_input_details()[0]["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    got = it.get_tensor(it.get_output_details()[0]["index"])
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # a second flavour reuses the SavedModel: onnx2tf ran once
    tflite_convert.build(src.read_bytes(), "dynamic-int8", None, tmp_path / "work")
    assert "onnx2tf" not in json.loads((tmp_path / "work" / "dynamic-int8.json").read_text())["seconds"]


@needs_onnx2tf
def test_an_operator_litert_lacks_is_named(tmp_path):
    """ONNX Det becomes TensorFlow's MatrixDeterminant, which LiteRT has no builtin for (only Flex)."""
    g = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "det",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    src = tmp_path / "det.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    v = compile_model(CompileRequest(str(src), {"pi": PI_TFLITE.model_copy(update={"precision": "fp32"})},
                                     Policy(timingRuns=2)),
                      None, tmp_path / "cache").variants["pi"]
    assert v.state == "Failed" and v.reason == "UnsupportedOperator", v.message
    assert "MatrixDeterminant" in v.message and "serve this model as ONNX" in v.message
