"""Structured pruning and knowledge distillation on the quickstart digits CNN (examples/quickstart): the trained
candidates enter the same search as fp32/int8, gated on the accuracy budget; training is seeded; bad specs are
refused naming the field. Needs the ``train`` extra (PyTorch CPU); about 40 s on one core."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from edgefleet.api.base import format_errors
from edgefleet.api.models import Distillation, Optimization, Pruning
from edgefleet.compiler import CompileError, CompileRequest, Policy, compile_model, core, load_profiles, train
from edgefleet.compiler.types import Candidate, CompileTarget, Latency, Metrics
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
INT8 = CompileTarget(format="onnx", precision="int8", runtime="onnxruntime")
MODEL, CALIB, EVAL = QUICKSTART / "digits_cnn.onnx", QUICKSTART / "digits_calib.npz", QUICKSTART / "digits_eval.npz"


@pytest.fixture(autouse=True)
def _torch_installed():
    why = train.missing()
    if why:
        pytest.fail(f"{why} (the dev extra includes it)")


def _compile(tmp_path: Path, policy: Policy, lines: list[str] | None = None):
    target = load_profiles()["cpu-amd64"]
    req = CompileRequest(source=str(MODEL), targets={"cpu-amd64": target}, policy=policy)
    out = [] if lines is None else lines
    return compile_model(req, cache_dir=tmp_path, progress=out.append).variants["cpu-amd64"]


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """One compile of the quickstart with pruning at 50 % and a mlp:[64] student (shared by the tests below)."""
    policy = Policy(calibration=CALIB, evaluation=EVAL, timingRuns=100,
                    pruning=Pruning(ratio=0.5, epochs=8, seed=0),
                    distillation=Distillation(student="mlp:[64]", epochs=60, seed=0),
                    accuracyBudget=Optimization.model_validate(
                        {"accuracyBudget": {"maxAccuracyDrop": 3.0}}).accuracy_budget)
    lines: list[str] = []
    v = _compile(tmp_path_factory.mktemp("cache"), policy, lines)
    return v, {c.name: c for c in v.candidates}, lines


def test_prune_candidate_is_smaller_at_least_as_fast_and_inside_the_budget(shrunk):
    v, c, lines = shrunk
    assert v.state == "Ready"
    pruned, fp32 = c["pruned"], c["fp32"]
    assert pruned.state in ("Chosen", "Lost") and pruned.withinBudget, pruned.why
    assert pruned.sizeBytes < 0.5 * fp32.sizeBytes  # three convolutions lose half their filters: ~1/4 of the weights
    assert pruned.latency.p50Ms1 <= fp32.latency.p50Ms1
    assert pruned.metrics.accuracyDelta >= -1.0  # inside the default 1-point budget too
    assert c["pruned+int8"].quantization == "static-int8" and c["pruned+int8"].sizeBytes < pruned.sizeBytes
    t = v.training["pruned"]
    assert t["detail"] == "filters 32->16, 64->32, 128->64"
    assert any(line.startswith("pruning: epoch 8/8 loss ") for line in lines), lines


def test_prune_publishes_a_graph_with_the_sources_inputs_and_halved_filters(shrunk):
    v, c, _ = shrunk
    status = {s["name"]: s for s in v.to_status()["candidates"]}
    path = status["pruned"]["artifact"].removeprefix("file://")
    m = onnx.load(path)
    dims = {t.name: list(t.dims) for t in m.graph.initializer}
    assert dims["w1"] == [16, 1, 3, 3] and dims["w2"] == [32, 16, 3, 3] and dims["w4"] == [10, 1024]
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    assert status["pruned"]["agreement"] >= 0.97


def test_distill_student_agrees_with_the_teacher_and_is_smaller(shrunk):
    v, c, _ = shrunk
    s = v.training["student"]
    assert s["agreement"] >= 0.95, s  # top-1 agreement with the teacher on the held-out evaluation data
    assert s["sizeBytes"] * 4 <= s["teacherSizeBytes"], s
    assert s["p50Ms"] is not None and s["teacherP50Ms"] == c["fp32"].latency.p50Ms1
    assert c["student+int8"].sizeBytes < c["student"].sizeBytes
    assert "student (mlp:[64]) vs teacher:" in v.message and "x smaller" in v.message


def test_prune_or_distill_chosen_only_when_it_wins_on_latency(shrunk):
    v, c, _ = shrunk
    chosen = c[v.chosen]
    plain = [x for x in c.values() if x.withinBudget and not core._is_trained(x.name)]
    if core._is_trained(chosen.name):
        assert all(chosen.latency.p50Ms1 * (1 + core.FASTER_MARGIN) < x.latency.p50Ms1 for x in plain)
    for x in c.values():
        if core._is_trained(x.name) and x.state == "Lost":
            assert x.why


def _cand(name: str, p50: float, size: int, quant: str = "none") -> Candidate:
    return Candidate(name=name, format="onnx", precision="fp32", quantization=quant, runtime="onnxruntime",
                     sizeBytes=size, latency=Latency(p50Ms1=p50), metrics=Metrics(), withinBudget=True)


def test_prune_selection_prefers_the_untrained_candidate_unless_faster_by_the_margin():
    target = INT8
    near = [_cand("fp32", 1.0, 1000), _cand("pruned", 0.97, 300)]
    assert core._select(near, target, True).name == "fp32"
    core._explain(near, near[0], True)
    assert "not faster than fp32" in near[1].why
    far = [_cand("fp32", 1.0, 1000), _cand("pruned", 0.5, 300)]
    assert core._select(far, target, True).name == "pruned"
    # a target measured elsewhere (host preference): trained only when nothing else fits the size budget
    host = [_cand("fp32", 1.0, 1000), _cand("pruned", 0.5, 300)]
    assert core._select(host, target, False).name == "fp32"
    host = [core._size_budget(_cand("fp32", 1.0, 1000), 500), _cand("pruned", 0.9, 300)]
    assert core._select(host, target, False).name == "pruned"


def test_prune_and_distill_are_deterministic_with_a_seed():
    src = core.preflight_onnx(MODEL.read_bytes())
    x = np.load(CALIB)["input"][:40]
    run = _runner(src)

    def pruned(seed: int) -> bytes:
        return train.prune(src, run, x, 0.5, 1, seed, 600, lambda _m: None).onnx

    def student(seed: int) -> bytes:
        return train.distill(src, run, x, "mlp:[16]", 2, 4.0, seed, 600, lambda _m: None).onnx

    assert pruned(3) == pruned(3) and pruned(3) != pruned(4)
    assert student(3) == student(3) and student(3) != student(4)


def _runner(data: bytes):
    from edgefleet.compiler.measure import open_runner, run_all

    r = open_runner("onnxruntime", data, 1)
    return lambda batch: run_all(r, {"input": batch})[0]


def test_prune_refuses_a_graph_that_is_not_a_chain():
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Add", ["r", "x"], ["y"])]  # a residual connection
    g = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    with pytest.raises(CompileError) as e:
        train.prune(data, _runner_named(data, "x"), np.ones((4, 4), np.float32), 0.5, 1, 0, 60, lambda _m: None)
    assert e.value.reason == "PruningUnsupported" and "not a chain" in e.value.message


def _runner_named(data: bytes, name: str):
    from edgefleet.compiler.measure import open_runner, run_all

    r = open_runner("onnxruntime", data, 1)
    return lambda batch: run_all(r, {name: batch})[0]


def test_prune_past_its_deadline_fails_the_candidate_and_fp32_is_still_chosen(tmp_path):
    policy = Policy(quantization="none", calibration=CALIB, evaluation=EVAL, timingRuns=5,
                    pruning=Pruning(ratio=0.5, epochs=500, deadline_seconds=1))
    v = _compile(tmp_path, policy)
    c = {x.name: x for x in v.candidates}
    assert v.state == "Ready" and v.chosen == "fp32"
    assert c["pruned"].state == "Failed" and c["pruned"].reason == "TrainingDeadlineExceeded"
    assert "optimization.pruning.deadlineSeconds" in c["pruned"].why
    assert v.training["pruned"]["reason"] == "TrainingDeadlineExceeded"
    assert "pruned failed: TrainingDeadlineExceeded" in v.message


@pytest.mark.parametrize(("opt", "field"), [
    ({"distillation": {"student": "resnet50"}, "calibration": {"uri": "https://x/c.npz"}}, "distillation.student"),
    ({"distillation": {"student": "mlp:[64]", "temperature": 0}, "calibration": {"uri": "https://x/c.npz"}},
     "distillation.temperature"),
    ({"pruning": {"ratio": 1.5}, "calibration": {"uri": "https://x/c.npz"}}, "pruning.ratio"),
    ({"pruning": {"ratio": 0.5}}, "calibration"),
    ({"distillation": {"student": "mlp:[64]"}}, "calibration"),
    ({"distillation": {"student": "mlp:[64]", "data": "somewhere"}, "calibration": {"uri": "https://x/c.npz"}},
     "distillation.data"),
])
def test_prune_distill_bad_specs_are_refused_naming_the_field(opt, field):
    with pytest.raises(ValidationError) as e:
        Optimization.model_validate(opt)
    lines = format_errors(e.value)
    assert any(line.startswith(field + ":") for line in lines), lines


def test_distill_cli_refuses_bad_json_naming_the_field(tmp_path):
    from edgefleet.compiler.cli import compile_command

    args = [str(MODEL), "--profile=cpu-amd64", f"--out={tmp_path}", f"--calibration={CALIB}", "--quiet"]
    r = CliRunner().invoke(compile_command, args + ['--distillation={"student":"cnn"}'])
    assert r.exit_code == 2 and "optimization.distillation.student" in r.output, r.output
    r = CliRunner().invoke(compile_command, [a for a in args if "calibration" not in a] + ['--pruning={"ratio":0.5}'])
    assert r.exit_code == 2 and "optimization.pruning" in r.output and "--calibration" in r.output, r.output


def test_prune_job_renders_the_policy_only_when_set():
    from edgefleet.render import compile_job

    pol = Policy(pruning=Pruning(ratio=0.4), distillation=Distillation(student="mlp:[32]"))
    flags = [f for f in compile_job_args(compile_job, pol) if f.startswith(("--pruning", "--distillation"))]
    assert json.loads(flags[0].split("=", 1)[1]) == {"ratio": 0.4, "epochs": 10, "seed": 0, "deadlineSeconds": 900}
    assert json.loads(flags[1].split("=", 1)[1])["student"] == "mlp:[32]"
    assert not [f for f in compile_job_args(compile_job, Policy()) if f.startswith(("--pruning", "--distillation"))]


def compile_job_args(compile_job, policy: Policy) -> list[str]:
    from edgefleet.settings import Settings

    req = compile_job.CompileJobRequest(
        model_namespace="ns", generation=1,
        request=CompileRequest(source="https://example.com/m.onnx", targets={"cpu-amd64": INT8}, policy=policy,
                               name="m"))
    settings = Settings(namespace="edgefleet-system", artifact_store="oci://registry.local:5000/edgefleet/models")
    return compile_job.render_compile_job(req, settings)["spec"]["template"]["spec"]["containers"][0]["args"]
