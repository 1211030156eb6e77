"""Input shapes the compiler measures on come from the model's metadata, the data or --input-shape; with
dims nothing fixes, quantization auto refuses instead of measuring candidates on made-up inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from edgefleet.compiler.cli import compile_command
from edgefleet.compiler.shapes import METADATA_KEY
from onnx import TensorProto, helper, numpy_helper

C, H, W = 3, 48, 192  # a text-direction classifier's input: only this size fits its Reshape


def classifier(tmp_path, metadata: dict | None = None):
    """x[N,3,H,W] (H, W dynamic) -> Reshape to [N, 3*48*192] -> MatMul -> y[N,2]: runs at 48x192 only."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((C * H * W, 2)).astype(np.float32) * 0.01, "w")
    flat = numpy_helper.from_array(np.array([-1, C * H * W], np.int64), "flat")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "flat"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])],
        "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [weight, flat])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata is not None:
        helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    path = tmp_path / "cls.onnx"
    onnx.save(model, path)
    return path


def compile_cli(tmp_path, model, *args):
    res = CliRunner().invoke(compile_command, [str(model), "--profile", "cpu-amd64", "--out", str(tmp_path / "out"),
                                               "--cache-dir", str(tmp_path / "cache"), "--timing-runs", "2",
                                               "--report", str(tmp_path / "report.json"), *args])
    report = json.loads((tmp_path / "report.json").read_text()) if (tmp_path / "report.json").exists() else None
    return res, report


def test_auto_refuses_dims_nothing_fixes_and_names_the_input(tmp_path):
    res, _ = compile_cli(tmp_path, classifier(tmp_path))
    assert res.exit_code == 2, res.output
    assert "error: UnknownInputShape: input 'x' has shape ?x3x?x?" in res.output
    assert "--input-shape x=1x3xNxN" in res.output
    assert not (tmp_path / "out" / "sha256").exists()


def ready_shapes(report) -> dict:
    variant = report["variants"]["cpu-amd64"]
    assert variant["state"] == "Ready", variant
    return variant


@pytest.mark.parametrize("how", ["--input-shape", "metadata", "calibration"])
def test_shapes_from_flag_metadata_or_data_let_auto_measure_the_real_input(tmp_path, how):
    args = []
    model = classifier(tmp_path)
    if how == "--input-shape":
        args = ["--input-shape", f"x=1x{C}x{H}x{W}"]
    elif how == "metadata":
        model = classifier(tmp_path, {"x": [1, C, H, W]})
    else:
        np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).random((8, C, H, W), np.float32))
        args = ["--calibration", str(tmp_path / "calib.npz")]
    res, report = compile_cli(tmp_path, model, *args)
    assert res.exit_code == 0, res.output
    variant = ready_shapes(report)
    failed = {c["name"]: c["reason"] for c in variant["candidates"] if c["state"] == "Failed"}
    assert {c["name"] for c in variant["candidates"]} >= {"fp32", "fp16", "dynamic-int8", "static-int8"}
    assert failed in ({}, {"static-int8": "NoCalibrationData"}), failed  # none failed on the input's shape
    assert all(c["metrics"]["cosine"] > 0.99 for c in variant["candidates"] if c["state"] != "Failed")


@pytest.mark.parametrize("flag, words", [
    ("x=1x3x48", "gives input 'x' shape [1, 3, 48], the model declares ['?', 3, '?', '?']"),
    ("x=1x4x48x192", "gives input 'x' shape [1, 4, 48, 192]"),
    ("image=1x3x48x192", "names inputs ['image'] the model does not have"),
    ("x=1x3x0x192", "is not NAME=DIMxDIM"),
])
def test_bad_input_shapes_name_the_problem(tmp_path, flag, words):
    res, _ = compile_cli(tmp_path, classifier(tmp_path), "--input-shape", flag)
    assert res.exit_code == 2 and words in res.output, res.output
