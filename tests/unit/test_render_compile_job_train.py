"""A compile Job that trains (optimization.pruning / .distillation): the compiler image with PyTorch when the
operator has one (compilerTrainImage), training resources, a deadline that covers each training, and, without a
train image, a refusal that names the setting; other compile Jobs are unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest
from edgefleet.api.compile import Distillation, Pruning
from edgefleet.compiler import train
from edgefleet.reconcile.compile_job import CompileOutcome
from edgefleet.reconcile.model import _conditions
from edgefleet.render.compile_job import TRAIN_FIX, render_compile_job, training_note
from edgefleet.settings import Settings
from test_render_compile_job import request

TRAIN = {"requests": {"cpu": "3", "memory": "6Gi"}, "limits": {"memory": "12Gi"}}


def settings(**over) -> Settings:
    return Settings(**{"namespace": "edgefleet-system", "artifact_store": "oci://registry.local:5000/m",
                       "compiler_image": "ghcr.io/edgefleet/compiler:9.9", "compile_deadline_seconds": 900,
                       "compile_resources": {"requests": {"cpu": "1", "memory": "2Gi"}}, "train_resources": TRAIN,
                       **over})


def training_request(pruning=True, distillation=False):
    req = request()
    policy = replace(req.request.policy,
                     pruning=Pruning(ratio=0.5, epochs=8, deadline_seconds=300) if pruning else None,
                     distillation=Distillation(student="mlp:[64]", epochs=20, deadline_seconds=600)
                     if distillation else None)
    return replace(req, request=replace(req.request, policy=policy))


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_a_compile_that_trains_runs_the_train_image_with_training_resources_and_a_longer_deadline():
    s = settings(compiler_train_image="ghcr.io/edgefleet/compiler-train:9.9")
    job = render_compile_job(training_request(distillation=True), s)
    c = container(job)
    assert c["image"] == "ghcr.io/edgefleet/compiler-train:9.9" and c["resources"] == TRAIN
    assert job["spec"]["activeDeadlineSeconds"] == 900 + 300 + 600  # the compile, then each training in full
    assert not any(e["name"] == "EDGEFLEET_TRAIN_FIX" for e in c["env"])
    plain = render_compile_job(request(), s)  # a compile that does not train is as before
    assert container(plain)["image"] == "ghcr.io/edgefleet/compiler:9.9"
    assert container(plain)["resources"] == s.compile_resources and plain["spec"]["activeDeadlineSeconds"] == 900
    assert plain["metadata"]["name"] != job["metadata"]["name"]


def test_the_train_image_is_part_of_the_jobs_identity():
    a = render_compile_job(training_request(), settings(compiler_train_image="r/compiler-train:1"))
    b = render_compile_job(training_request(), settings(compiler_train_image="r/compiler-train:2"))
    assert a["metadata"]["name"] != b["metadata"]["name"]
    plain = [render_compile_job(request(), settings(compiler_train_image=f"r/compiler-train:{i}")) for i in (1, 2)]
    assert plain[0]["metadata"]["name"] == plain[1]["metadata"]["name"]  # not a training compile: not restarted


def test_without_a_train_image_the_candidate_refusal_names_the_setting(monkeypatch):
    job = render_compile_job(training_request(), settings())
    c = container(job)
    assert c["image"] == "ghcr.io/edgefleet/compiler:9.9"
    (fix,) = [e["value"] for e in c["env"] if e["name"] == "EDGEFLEET_TRAIN_FIX"]
    assert fix == TRAIN_FIX and "compilerTrainImage" in fix
    monkeypatch.setenv("EDGEFLEET_TRAIN_FIX", fix)  # what the compiler in that Job says when torch is absent
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "torch" else object())
    with pytest.raises(train.CompileError) as err:
        train._torch()
    assert err.value.reason == "MissingExtra" and err.value.fix == TRAIN_FIX
    assert "need PyTorch, which this compiler lacks" in err.value.message
    monkeypatch.delenv("EDGEFLEET_TRAIN_FIX")
    assert train.missing().endswith("fix: pip install 'edgefleet[train]'")  # the CLI on a laptop


def test_the_running_job_says_what_it_trains_in_the_variants_and_the_compiled_condition():
    s = settings(compiler_train_image="r/compiler-train:1")
    req = training_request(distillation=True)
    note = training_note(req, "compile-digits-x", s)
    assert note == ("training pruning (8 epochs, deadline 300 s), distillation (20 epochs, deadline 600 s) in "
                    "r/compiler-train:1; epoch and loss: kubectl logs -n edgefleet-system job/compile-digits-x")
    outcome = CompileOutcome(s, b"k" * 32, "c" * 64, ["cpu-arm64"], "compile-digits-x")
    outcome.training = note
    variants = outcome.running()
    assert variants == [{"profile": "cpu-arm64", "state": "Compiling", "reason": "Training", "message": note}]
    conds = _conditions({}, variants, 3, compiling=True)
    compiled = next(c for c in conds if c["type"] == "Compiled")
    assert compiled["reason"] == "Training" and compiled["message"] == f"compiling 1 variants; {note}"
    assert training_note(request(), "j", s) is None
    assert "no PyTorch" in training_note(req, "j", settings()) and TRAIN_FIX in training_note(req, "j", settings())
