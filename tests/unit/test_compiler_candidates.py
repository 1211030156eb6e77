"""The compiler publishes every candidate inside the accuracy budget (content-addressed, listed in the report
and in status.variants[].candidates), so a benchmark Job can measure them on a node of the class; the
hostLatencyMs test hook makes the host prefer a named candidate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from edgefleet.artifacts import LocalStore
from edgefleet.compiler import AccuracyBudget, CompileRequest, CompileTarget, Policy, compile_model

M = Path(__file__).resolve().parent.parent / "fixtures" / "models"
CPU = CompileTarget(format="onnx", precision="int8", runtime="onnxruntime", execution_provider="cpu")


def _compile(tmp: Path, **policy):
    req = CompileRequest(str(M / "digits_cnn.onnx"), {"cpu-amd64": CPU},
                         Policy(calibration=M / "digits_calib.npz", evaluation=M / "digits_eval.npz", timingRuns=5,
                                **policy), name="digits")
    store = LocalStore(tmp / "store")
    return compile_model(req, store, tmp / "cache").variants["cpu-amd64"], store


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("cands"), accuracyBudget=AccuracyBudget(max_accuracy_drop=1.0))


def test_every_candidate_inside_the_budget_is_published_with_its_own_digest(compiled):
    v, store = compiled
    inside = [c for c in v.candidates if c.state != "Failed" and c.withinBudget]
    assert len(inside) >= 2, [(c.name, c.state, c.withinBudget) for c in v.candidates]
    for c in inside:
        data = store.get(c.artifact, c.sha256)  # verifies the digest
        assert "sha256:" + hashlib.sha256(data).hexdigest() == c.sha256
    assert len({c.sha256 for c in inside}) == len(inside)
    for c in v.candidates:
        if c.state == "Failed" or not c.withinBudget:
            assert c.artifact is None, c.name
    status = v.to_status()["candidates"]
    assert [s["name"] for s in status][0] == v.chosen, "the chosen candidate comes first"
    assert {s["name"] for s in status} == {c.name for c in inside}
    assert status[0]["digest"] == v.digest and status[0]["artifact"] == v.artifact
    for s in status:
        assert None not in s.values() and {"artifact", "digest", "format", "latencyP50Ms"} <= set(s)


def test_a_candidate_outside_the_budget_is_not_published(tmp_path):
    # a budget of cosine 0.99999 leaves only fp32 (and maybe fp16) inside: int8 candidates are not published
    v, _ = _compile(tmp_path, accuracyBudget=AccuracyBudget(min_cosine=0.99999))
    outside = [c for c in v.candidates if c.state != "Failed" and not c.withinBudget]
    assert outside, [(c.name, c.metrics.cosine) for c in v.candidates]
    assert all(c.artifact is None for c in outside)
    assert {s["name"] for s in v.to_status()["candidates"]}.isdisjoint(c.name for c in outside)


def test_host_latency_hook_makes_the_host_choose_the_named_candidate(compiled, tmp_path):
    v, _ = compiled
    other = next(c.name for c in v.candidates if c.state == "Lost" and c.withinBudget)
    forced, _ = _compile(tmp_path, accuracyBudget=AccuracyBudget(max_accuracy_drop=1.0), hostLatencyMs={other: 0.0001})
    assert forced.chosen == other
    chosen = next(c for c in forced.candidates if c.name == other)
    assert chosen.latency.p50Ms1 == 0.0001 and "hostLatencyMs" in chosen.latency.measuredOn
    assert forced.cacheKey != v.cacheKey, "the hook is part of the cache key: a real compile is never reused"
