"""Every example manifest parses, every object of our kinds validates through the pydantic models, and the
Argo CD Lua health checks give the right verdict on sample objects (executed with lupa when installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from edgefleet.api import API_VERSION, KINDS, load

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
ARGO_CM = EXAMPLES / "gitops" / "argocd" / "argocd-cm.yaml"
FLUX = EXAMPLES / "gitops" / "flux"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*.yaml") if p.name != "kustomization.yaml")


def _ours() -> list[tuple[str, dict]]:
    out = []
    for path in _manifests():
        for i, doc in enumerate(_docs(path)):
            if doc.get("apiVersion") == API_VERSION and doc.get("kind") in KINDS:
                out.append((f"{path.relative_to(EXAMPLES)}#{i}", doc))
    return out


OURS = _ours()


def test_examples_exist():
    for folder in ("jetson-gpu", "coral", "rollout-waves", "gitops/argocd", "gitops/flux"):
        assert (EXAMPLES / folder).is_dir(), folder
        assert (EXAMPLES / folder / "README.md").exists(), f"{folder}: a README says how to apply it"
    kinds = {doc["kind"] for _, doc in OURS}
    assert kinds == set(KINDS), f"the examples should show every kind, found {kinds}"


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_manifest_parses(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: every object needs apiVersion and kind"
        assert doc.get("metadata", {}).get("name") or doc["kind"] in ("Kustomization", "Fleet"), path


@pytest.mark.parametrize(("where", "doc"), OURS, ids=[w for w, _ in OURS])
def test_our_kinds_validate(where, doc):
    obj = load(doc)
    # the wire form round-trips and keeps every field the example sets
    wire = obj.to_dict()
    assert type(obj).model_validate(wire) == obj, where
    assert set(doc["spec"]) <= set(wire["spec"]), where


def _by(kind: str, name: str) -> dict:
    return next(doc for _, doc in OURS if doc["kind"] == kind and doc["metadata"]["name"] == name)


def test_rollout_waves_example():
    ed = load(_by("EdgeDeployment", "keyword-spotter"))
    assert ed.spec.rollout.waves == [10, 50, 100]
    assert ed.spec.rollout.auto_rollback is True
    assert ed.spec.rollout.health_gate.timeout_seconds > ed.spec.rollout.health_gate.min_ready_seconds


def test_jetson_example_profile_wins_on_orin_nano():
    from edgefleet.api import builtin_profiles, label_selector_matches

    custom = load(_by("HardwareProfile", "jetson-orin-nano-int8"))
    nano = {"kubernetes.io/arch": "arm64", "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-Jetson-Orin-Nano", "node-role.kubernetes.io/edge": ""}
    matching = [p for p in [*builtin_profiles(), custom] if label_selector_matches(p.spec.node_selector, nano)]
    assert max(matching, key=lambda p: p.spec.priority).metadata["name"] == "jetson-orin-nano-int8"
    em = load(_by("EdgeModel", "detector"))
    builtin = {p.metadata["name"] for p in builtin_profiles()}
    assert set(em.spec.target_profiles.names) <= builtin | {"jetson-orin-nano-int8"}


def test_coral_example_targets_the_edge_tpu():
    em = load(_by("EdgeModel", "mobilenet"))
    assert em.spec.format == "tflite" and em.spec.optimization.quantization == "static-int8"
    assert em.spec.target_profiles.names == ["coral-edgetpu"]


def test_model_sources_are_configmap_or_oci():
    for where, doc in OURS:
        if doc["kind"] == "EdgeModel" and where.startswith(("jetson-gpu/", "coral/", "rollout-waves/")):
            source = load(doc).spec.source
            assert source.config_map is not None or source.uri.startswith("oci://"), where


def test_gitops_manifests_point_at_real_paths():
    for path in (EXAMPLES / "gitops" / "argocd").glob("application-*.yaml"):
        (app,) = _docs(path)
        assert (REPO / app["spec"]["source"]["path"]).is_dir(), path
    (hr,) = _docs(FLUX / "helmrelease.yaml")
    assert (REPO / hr["spec"]["chart"]["spec"]["chart"]).is_dir()
    (ks,) = _docs(FLUX / "models-kustomization.yaml")
    assert (REPO / ks["spec"]["path"]).is_dir()
    assert ks["spec"]["wait"] is True
    checked = {h["kind"] for h in ks["spec"]["healthCheckExprs"]}
    assert checked == {"EdgeModel", "EdgeDeployment"}
    deployed = {(d["kind"], d["metadata"]["name"]) for where, d in OURS if where.startswith("rollout-waves/")}
    assert {(h["kind"], h["name"]) for h in ks["spec"]["healthChecks"]} == deployed


# ---------------------------------------------------------------- Argo CD Lua health checks


def _health_scripts() -> dict[str, str]:
    (cm,) = _docs(ARGO_CM)
    prefix = "resource.customizations.health."
    return {k.removeprefix(prefix): v for k, v in cm["data"].items() if k.startswith(prefix)}


def test_argocd_health_keys():
    assert set(_health_scripts()) == {"edgefleet.io_EdgeModel", "edgefleet.io_EdgeDeployment"}


def _cond(type_: str, status: str, reason: str = "Test", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message or f"{type_} is {status}",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}


def _obj(kind: str, conditions: list[dict] | None, observed: int | None = 2, **status) -> dict:
    obj = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "x", "namespace": "ns", "generation": 2}}
    if conditions is not None:
        obj["status"] = {"conditions": conditions, **status}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


MODEL_CASES = [
    ("no status yet", _obj("EdgeModel", None), "Progressing"),
    ("old generation", _obj("EdgeModel", [_cond("Ready", "True")], observed=1), "Progressing"),
    ("ready", _obj("EdgeModel", [_cond("Ready", "True")]), "Healthy"),
    ("compiling", _obj("EdgeModel", [_cond("Ready", "False", "Compiling")],
                       variants=[{"profile": "cpu-amd64", "state": "Compiling"}]), "Progressing"),
    ("variant failed", _obj("EdgeModel", [_cond("Ready", "False", "CompileFailed")],
                            variants=[{"profile": "coral-edgetpu", "state": "Failed", "message": "too big"}]),
     "Degraded"),
    ("degraded", _obj("EdgeModel", [_cond("Ready", "False"), _cond("Degraded", "True", "SourceDigestMismatch")]),
     "Degraded"),
]
DEPLOYMENT_CASES = [
    ("no status yet", _obj("EdgeDeployment", None), "Progressing"),
    ("old generation", _obj("EdgeDeployment", [_cond("Available", "True")], observed=1), "Progressing"),
    ("available", _obj("EdgeDeployment", [_cond("Available", "True"), _cond("Progressing", "False"),
                                          _cond("Degraded", "False")]), "Healthy"),
    ("wave 2 of 3", _obj("EdgeDeployment", [_cond("Available", "True"), _cond("Progressing", "True", "Wave2")]),
     "Progressing"),
    ("rolled back", _obj("EdgeDeployment", [_cond("Available", "True"), _cond("Progressing", "False"),
                                            _cond("Degraded", "True", "RolledBack")]), "Degraded"),
    ("stalled", _obj("EdgeDeployment", [_cond("Available", "False"), _cond("Progressing", "False")]), "Degraded"),
]


def test_sample_statuses_are_valid():
    """The sample objects are real status shapes (validated by the models), not made-up ones."""
    for _, obj, _ in MODEL_CASES + DEPLOYMENT_CASES:
        if "status" in obj:
            cls = KINDS[obj["kind"]]
            status_cls = cls.model_fields["status"].annotation.__args__[0]
            status_cls.model_validate(obj["status"])


@pytest.fixture(scope="module")
def lua():
    lupa = pytest.importorskip("lupa", reason="lupa (PyPI) is not installed: the Argo CD Lua health scripts "
                                              "are only checked for presence, not executed")
    return lupa


def _run(lua_module, script: str, obj: dict) -> dict:
    runtime = lua_module.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value

    runtime.globals().obj = to_lua(obj)
    result = runtime.execute(script)
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize(("case", "obj", "expected"), MODEL_CASES, ids=[c for c, _, _ in MODEL_CASES])
def test_argocd_edgemodel_health(lua, case, obj, expected):
    got = _run(lua, _health_scripts()["edgefleet.io_EdgeModel"], obj)
    assert got["status"] == expected, f"{case}: {got}"
    assert got["message"], case


@pytest.mark.parametrize(("case", "obj", "expected"), DEPLOYMENT_CASES, ids=[c for c, _, _ in DEPLOYMENT_CASES])
def test_argocd_edgedeployment_health(lua, case, obj, expected):
    got = _run(lua, _health_scripts()["edgefleet.io_EdgeDeployment"], obj)
    assert got["status"] == expected, f"{case}: {got}"
    assert got["message"], case
