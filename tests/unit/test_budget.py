"""HardwareProfile.spec.budget is enforced: maxModelSizeBytes refuses larger candidates (and fails the
variant when none fits), maxMemoryBytes becomes the runtime container's memory limit."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner
from edgefleet.api import EdgeDeployment, HardwareProfile, Variant, builtin_profiles
from edgefleet.compiler import CompileTarget, load_profiles
from edgefleet.compiler.cli import compile_command
from edgefleet.render import render_class
from edgefleet.render.compile_job import profiles_document
from test_compiler_shapes import C, H, W, classifier

TARGET = {"format": "onnx", "precision": "int8", "runtime": "onnxruntime", "executionProvider": "cpu"}


def profile_file(tmp_path, budget: dict | None) -> str:
    spec = {"nodeSelector": {"matchLabels": {"kubernetes.io/arch": "amd64"}}, "target": TARGET,
            "runtimeImage": "ghcr.io/edgefleet/runtime-cpu:0.1.0"}
    if budget:
        spec["budget"] = budget
    doc = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "HardwareProfile", "metadata": {"name": "small"},
           "spec": spec}
    HardwareProfile.model_validate(doc)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def compile_for(tmp_path, budget):
    model = classifier(tmp_path)  # fp32 ~221 kB, fp16 ~111 kB, int8 ~56 kB
    res = CliRunner().invoke(compile_command, [
        str(model), "--profiles-file", profile_file(tmp_path, budget), "--out", str(tmp_path / "out"),
        "--cache-dir", str(tmp_path / "cache"), "--timing-runs", "2", "--input-shape", f"x=1x{C}x{H}x{W}",
        "--report", str(tmp_path / "report.json"), "--quiet"])
    return res, json.loads((tmp_path / "report.json").read_text())["variants"]["small"]


def test_candidates_over_the_size_budget_cannot_win(tmp_path):
    res, variant = compile_for(tmp_path, {"maxModelSizeBytes": 100_000})
    assert res.exit_code == 0, res.output
    assert variant["state"] == "Ready" and variant["sizeBytes"] <= 100_000 and variant["precision"] == "int8"
    over = {c["name"]: c for c in variant["candidates"] if c["reason"] == "OverSizeBudget"}
    assert set(over) == {"fp32", "fp16"}
    assert all("> spec.budget.maxModelSizeBytes 100000" in c["why"] and c["state"] == "Failed"
               for c in over.values())


def test_a_budget_nothing_fits_fails_the_variant_with_the_fix(tmp_path):
    res, variant = compile_for(tmp_path, {"maxModelSizeBytes": 10_000})
    assert res.exit_code == 1, res.output
    assert variant["state"] == "Failed" and variant["reason"] == "ModelSizeBudgetExceeded"
    assert "raise spec.budget.maxModelSizeBytes" in variant["message"]
    assert "dynamic-int8: " in variant["message"] and "> spec.budget.maxModelSizeBytes 10000" in variant["message"]


def test_the_budget_reaches_compile_jobs_and_the_cache_key(tmp_path):
    target = CompileTarget.of_profile({"target": TARGET,
                                       "budget": {"maxModelSizeBytes": 5000, "maxMemoryBytes": 2**30}})
    assert target.max_model_size_bytes == 5000 and target.to_dict()["maxModelSizeBytes"] == 5000
    assert CompileTarget.of_profile({"target": TARGET}).to_dict() == TARGET  # no budget: the target as before
    document = tmp_path / "profiles.json"
    document.write_text(profiles_document({"small": target}))
    item = json.loads(document.read_text())["items"][0]
    assert item["spec"] == {"target": TARGET, "budget": {"maxModelSizeBytes": 5000}}
    assert load_profiles(document)["small"] == target


def deployment() -> EdgeDeployment:
    return EdgeDeployment.model_validate({"metadata": {"name": "d", "namespace": "n", "uid": "u"},
                                          "spec": {"modelRef": {"name": "m"}}})


def runtime_resources(profile: HardwareProfile) -> dict:
    variant = Variant(profile=profile.metadata["name"], state="Ready", digest="sha256:" + "a" * 64, artifact="x")
    ds = render_class(deployment(), profile, variant, [profile], "/var/lib/edgefleet/cache")
    return next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "runtime")["resources"]


def test_max_memory_bytes_is_the_runtime_memory_limit():
    base = next(p for p in builtin_profiles() if p.metadata["name"] == "nvidia-gpu").to_dict()
    assert runtime_resources(HardwareProfile.model_validate(base))["limits"]["memory"] == "1Gi"
    small = HardwareProfile.model_validate({**base, "spec": {**base["spec"], "budget": {"maxMemoryBytes": 96 * 2**20}}})
    resources = runtime_resources(small)
    assert resources["limits"] == {"memory": str(96 * 2**20), "nvidia.com/gpu": "1"}
    assert resources["requests"]["memory"] == str(96 * 2**20)  # never more than the limit
    big = HardwareProfile.model_validate({**base, "spec": {**base["spec"], "budget": {"maxMemoryBytes": 8 * 2**30}}})
    assert runtime_resources(big)["requests"]["memory"] == str(128 * 2**20)
