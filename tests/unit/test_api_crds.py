"""The generated CRDs: committed files match the models, schemas are structural, CEL rules bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from edgefleet.api.crdgen import crds_command, render_all

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
GENERATED = render_all()


def test_committed_crds_match_the_models():
    committed = {p.name for p in CRDS.glob("*.yaml")}
    assert committed == set(GENERATED), "run `edgefleet crds` and commit crds/"
    for name, text in GENERATED.items():
        assert (CRDS / name).read_text() == text, f"crds/{name} drifted from the models: run `edgefleet crds`"


def test_check_mode_passes_and_detects_drift(tmp_path):
    runner = CliRunner()
    assert runner.invoke(crds_command, ["--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(crds_command, ["--out", str(tmp_path), "--check"]).exit_code == 0
    path = tmp_path / "edgemodels.edgefleet.io.yaml"
    path.write_text(path.read_text().replace("maxLength: 253", "maxLength: 254", 1))
    result = runner.invoke(crds_command, ["--out", str(tmp_path), "--check"])
    assert result.exit_code == 1
    assert "edgemodels.edgefleet.io.yaml" in result.output
    assert runner.invoke(crds_command, ["--out", str(CRDS), "--check"]).exit_code == 0


def crd(plural: str) -> dict:
    return yaml.safe_load(GENERATED[f"{plural}.edgefleet.io.yaml"])


def walk(node: dict, path: str = ""):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("plural", ["hardwareprofiles", "edgemodels", "edgedeployments"])
def test_schema_is_structural_and_bounded(plural):
    root = crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(root):
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "not", "nullable", "definitions", "$defs", "title"):
            assert banned not in node, f"{plural}{path}: {banned} is not allowed in a structural schema"
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, f"{plural}{path}"
        assert not ("properties" in node and "additionalProperties" in node), f"{plural}{path}"
        if path.startswith((".spec", ".status")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{plural}{path}: no description for kubectl explain"
        if node["type"] == "string" and path != ".apiVersion" and path != ".kind":
            assert "enum" in node or "maxLength" in node or "format" in node, f"{plural}{path}: unbounded string"
        if node["type"] == "array":
            assert "maxItems" in node, f"{plural}{path}: unbounded list"
        if node["type"] == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{plural}{path}: unbounded map"
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["rule"] and rule["message"], f"{plural}{path}"


def test_names_columns_and_subresources():
    expected = {
        "hardwareprofiles": ("HardwareProfile", "hwp", "Cluster"),
        "edgemodels": ("EdgeModel", "em", "Namespaced"),
        "edgedeployments": ("EdgeDeployment", "ed", "Namespaced"),
    }
    for plural, (kind, short, scope) in expected.items():
        doc = crd(plural)
        assert doc["metadata"]["name"] == f"{plural}.edgefleet.io"
        spec = doc["spec"]
        assert spec["group"] == "edgefleet.io" and spec["scope"] == scope
        assert spec["names"]["kind"] == kind and spec["names"]["shortNames"] == [short]
        assert spec["names"]["categories"] == ["edgefleet"]
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
        assert columns["Age"] == ".metadata.creationTimestamp"
    em = {c["name"]: c["jsonPath"] for c in crd("edgemodels")["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert em["Ready"] == '.status.conditions[?(@.type=="Ready")].status' and "Variants" in em
    ed = {c["name"]: c["jsonPath"] for c in crd("edgedeployments")["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert ed["Ready"] == '.status.conditions[?(@.type=="Available")].status' and "Nodes" in ed


def prop(plural: str, dotted: str) -> dict:
    node = crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in dotted.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def test_openapi_bounds_enums_and_patterns():
    assert prop("edgemodels", "spec.source.digest")["pattern"] == "^sha256:[a-f0-9]{64}$"
    assert prop("edgemodels", "spec.optimization.quantization")["enum"] == [
        "auto", "none", "fp16", "dynamic-int8", "static-int8"]
    assert prop("edgemodels", "spec.optimization.quantization")["default"] == "auto"
    sparsity = prop("edgemodels", "spec.optimization.sparsity")
    assert (sparsity["minimum"], sparsity["maximum"]) == (0, 0.95)
    assert prop("edgedeployments", "spec.rollout.maxUnavailable")["x-kubernetes-int-or-string"] is True
    assert prop("edgedeployments", "spec.rollout.maxUnavailable")["default"] == "25%"
    assert prop("hardwareprofiles", "spec.priority")["maximum"] == 1000
    assert prop("hardwareprofiles", "spec.extendedResources")["additionalProperties"]["type"] == "string"
    assert prop("edgemodels", "status.conditions")["x-kubernetes-list-map-keys"] == ["type"]


def test_cross_field_rules_are_in_the_crd():
    rules = {plural: [r["message"] for _, node in walk(crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
                      for r in node.get("x-kubernetes-validations", [])]
             for plural in ("edgemodels", "edgedeployments", "hardwareprofiles")}
    em, ed = " ".join(rules["edgemodels"]), " ".join(rules["edgedeployments"])
    assert "optimization.calibration is required when optimization.quantization is static-int8" in em
    assert "source.uri or source.configMap" in em
    assert "spec.replicas is required when mode is Replicas" in ed
    assert "spec.replicas is not allowed when mode is PerNode" in ed
    assert "rollout.waves and rollout.canaryPercent are exclusive" in ed
    assert "rollout.waves must be ascending and end at 100" in ed
    assert rules["hardwareprofiles"]
