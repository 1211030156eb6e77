"""The compile Job (executor job) is a pure function of the request and the settings."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from edgefleet.api import AccuracyBudget
from edgefleet.api.compile import CompileRequest, CompileTarget, Policy
from edgefleet.compiler import load_profiles
from edgefleet.compiler.cli import compile_command
from edgefleet.render.compile_job import (
    INPUTS_DIR,
    PROFILES_FILE,
    REPORT_KEY_DIR,
    WATCH_LABELS,
    CompileJobRequest,
    compile_job_name,
    compile_key,
    content_key,
    inputs_files,
    inputs_size,
    profiles_document,
    render_compile_inputs,
    render_compile_job,
    render_report_key,
    report_key_secret,
    report_ref,
)
from edgefleet.settings import Settings
from edgefleet_runtime.sealed import BINDING_ENV, KEY_FILE_ENV

TARGETS = {"cpu-arm64": {"format": "onnx", "precision": "int8", "runtime": "onnxruntime", "executionProvider": "cpu"},
           "coral-edgetpu": {"format": "tflite", "precision": "int8", "runtime": "litert",
                             "delegate": "libedgetpu.so.1"}}


@pytest.fixture
def settings() -> Settings:
    return Settings(namespace="edgefleet-system", artifact_store="oci://registry.local:5000/edgefleet/models",
                    artifact_insecure=True, compiler_image="ghcr.io/edgefleet/compiler:9.9",
                    compile_resources={"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "5Gi"}},
                    compile_timing_runs=7, compile_deadline_seconds=900)


def request(model_namespace="team-a", model_name="digits", generation=3, targets=TARGETS,
            source="oci://registry.local:5000/models/digits:1", digest="sha256:" + "a" * 64, quantization="auto",
            max_accuracy_drop=1.0, min_cosine=None, evaluation=None, input_shapes=None, files=None,
            timing_runs=7) -> CompileJobRequest:
    """The Job's request: the same CompileRequest the inline compile gets, its files under INPUTS_DIR."""
    budget = AccuracyBudget(max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine)
    policy = Policy(quantization=quantization, accuracyBudget=budget, timingRuns=timing_runs,
                    evaluation=Path(INPUTS_DIR) / evaluation if evaluation else None,
                    inputShapes=input_shapes or {})
    compile_request = CompileRequest(source=source, digest=digest, name=model_name, policy=policy,
                                     targets={k: CompileTarget.model_validate(v) for k, v in targets.items()})
    return CompileJobRequest(model_namespace=model_namespace, generation=generation, request=compile_request,
                             files=files or {})


def flags(args: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in args[1:]:
        k, _, v = a.partition("=")
        out.setdefault(k, []).append(v)
    return out


def test_job_shape(settings):
    job = render_compile_job(request(), settings)
    meta, spec = job["metadata"], job["spec"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert meta["namespace"] == "edgefleet-system" and "ownerReferences" not in meta  # cross-namespace: ownerless
    assert WATCH_LABELS.items() <= meta["labels"].items()
    assert meta["labels"]["edgefleet.io/model-namespace"] == "team-a"
    assert meta["labels"]["edgefleet.io/model"] == "digits"
    assert meta["annotations"]["edgefleet.io/model-namespace"] == "team-a"
    assert meta["annotations"]["edgefleet.io/model"] == "digits"
    assert meta["annotations"]["edgefleet.io/report"] == report_ref(settings.artifact_store, meta["name"])
    assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] == 900
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [1, 2]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert spec["template"]["metadata"]["labels"] == meta["labels"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/edgefleet/compiler:9.9" and c["command"] == ["edgefleet", "compile"]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "5Gi"}}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "EDGEFLEET_OCI_INSECURE", "value": "1"} in c["env"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[INPUTS_DIR]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["inputs"]["configMap"]["name"] == meta["name"] and "emptyDir" in volumes["work"]


def test_args(settings):
    job = render_compile_job(request(), settings)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "oci://registry.local:5000/models/digits:1"
    f = flags(args)
    assert f["--profiles-file"] == [f"{INPUTS_DIR}/{PROFILES_FILE}"]
    assert f["--profile"] == ["coral-edgetpu", "cpu-arm64"]
    assert f["--quantization"] == ["auto"] and f["--max-accuracy-drop"] == ["1.0"] and "--min-cosine" not in f
    assert f["--digest"] == ["sha256:" + "a" * 64] and f["--name"] == ["digits"]
    assert f["--out"] == [settings.artifact_store]
    # the Job pushes its own report only; the compile cache is written by the operator once it verified it
    assert f["--report"] == [f"{settings.artifact_store}:{job['metadata']['name']}-report"]
    assert f["--timing-runs"] == ["7"]
    assert "--calibration" not in f and "--eval" not in f


def test_configmap_inputs_become_files(settings):
    req = request(source=f"{INPUTS_DIR}/source-m.onnx", files={"source-m.onnx": b"\x08\x01",
                  "evaluation-e.npz": b"PK\x03\x04"}, evaluation="evaluation-e.npz", min_cosine=0.98)
    job = render_compile_job(req, settings)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == f"{INPUTS_DIR}/source-m.onnx"
    f = flags(args)
    assert f["--eval"] == [f"{INPUTS_DIR}/evaluation-e.npz"] and f["--min-cosine"] == ["0.98"]
    job["metadata"]["uid"] = "1234"
    cm = render_compile_inputs(req, job)
    assert cm["metadata"]["name"] == job["metadata"]["name"] and cm["metadata"]["namespace"] == "edgefleet-system"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "1234"
    data = {k: base64.b64decode(v) for k, v in cm["binaryData"].items()}
    assert data["source-m.onnx"] == b"\x08\x01" and data["evaluation-e.npz"] == b"PK\x03\x04"
    assert set(json.loads(data[PROFILES_FILE])["items"][0]) >= {"kind", "metadata", "spec"}
    assert inputs_size(req) == sum(len(v) for v in cm["binaryData"].values())


def test_profiles_document_is_what_the_cli_reads(tmp_path):
    path = tmp_path / "profiles.json"
    path.write_text(profiles_document({k: CompileTarget.model_validate(v) for k, v in TARGETS.items()}))
    loaded = load_profiles(path)
    assert {k: v.to_dict() for k, v in loaded.items()} == TARGETS
    assert yaml.safe_load(path.read_text())["kind"] == "List"


def test_name_is_deterministic_and_changes_with_inputs(settings):
    a = render_compile_job(request(), settings)
    assert a == render_compile_job(request(), settings)  # a restarted operator finds the same Job
    name = a["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    others = [request(generation=4), request(model_namespace="team-b"), request(quantization="fp16"),
              request(targets={"cpu-arm64": TARGETS["cpu-arm64"]}), request(digest=None),
              request(source=f"{INPUTS_DIR}/source-m.onnx", files={"source-m.onnx": b"1"})]
    names = {render_compile_job(r, settings)["metadata"]["name"] for r in others}
    assert name not in names and len(names) == len(others)
    newer = settings.model_copy(update={"compiler_image": "ghcr.io/edgefleet/compiler:10"})
    assert render_compile_job(request(), newer)["metadata"]["name"] != name
    files = request(source=f"{INPUTS_DIR}/source-m.onnx", files={"source-m.onnx": b"1"})
    changed = request(source=f"{INPUTS_DIR}/source-m.onnx", files={"source-m.onnx": b"2"})
    assert compile_key(files, settings) != compile_key(changed, settings)


def test_tenant_content_key_ignores_the_generation_only_never_the_namespace(settings):
    """The compile cache decides "no Job needed": a namespace must never get another namespace's compile."""
    key = content_key(request(), settings)
    assert content_key(request(generation=9), settings) == key
    assert content_key(request(model_namespace="team-b"), settings) != key
    assert compile_key(request(model_namespace="team-b"), settings) != compile_key(request(), settings)
    others = [request(model_name="digits-b"), request(quantization="fp16"), request(digest=None),
              request(targets={"cpu-arm64": TARGETS["cpu-arm64"]}), request(max_accuracy_drop=2.0)]
    assert key not in {content_key(r, settings) for r in others}
    signing = settings.model_copy(update={"signing_key_secret": "keys"})
    assert content_key(request(), signing) != key


def test_long_and_dotted_model_names(settings):
    req = request(model_name="a.very-long.model-name-" + "x" * 200)
    job = render_compile_job(req, settings)
    name = job["metadata"]["name"]
    assert len(name) <= 63 and "." not in name
    assert name == compile_job_name(req, compile_key(req, settings))
    assert all(len(v) <= 63 for v in job["metadata"]["labels"].values())
    assert job["metadata"]["annotations"]["edgefleet.io/model"] == req.model_name  # exact, for the watch


def test_secure_registry_gets_no_insecure_env(settings):
    job = render_compile_job(request(), settings.model_copy(update={"artifact_insecure": False}))
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "EDGEFLEET_OCI_INSECURE" not in {e["name"] for e in env}


def test_cli_rejects_an_untagged_oci_report(tmp_path):
    result = CliRunner().invoke(compile_command, ["x.onnx", "--out", str(tmp_path), "--report", "oci://h:1/repo"])
    assert result.exit_code == 2 and "needs a tag" in result.output


def test_input_shapes_reach_the_compiler_and_only_then_change_the_name(settings):
    plain, shaped = request(), request(input_shapes={"x": [1, 3, 48, 192], "mask": [1, 48]})
    args = render_compile_job(shaped, settings)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flags(args)["--input-shape"] == ["mask=1x48", "x=1x3x48x192"]
    assert "--input-shape" not in flags(render_compile_job(plain, settings)["spec"]["template"]["spec"][
        "containers"][0]["args"])
    assert compile_key(shaped, settings) != compile_key(plain, settings)


def test_compile_pods_go_where_the_settings_say(settings):
    pod = render_compile_job(request(), settings)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    toleration = {"key": "edgefleet.io/real-node", "operator": "Exists", "effect": "NoSchedule"}
    placed = settings.model_copy(update={"compile_node_selector": {"edgefleet.io/real-node": "true"},
                                         "compile_tolerations": [toleration]})
    job = render_compile_job(request(), placed)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"edgefleet.io/real-node": "true"} and pod["tolerations"] == [toleration]
    assert job["metadata"]["name"] == render_compile_job(request(), settings)["metadata"]["name"]


def test_the_job_hands_the_compiler_the_request_the_inline_path_would(settings, tmp_path, monkeypatch):
    """One request object: the Job's flags, parsed by the real `edgefleet compile`, give back its CompileRequest."""
    from edgefleet.compiler import core

    req = request(source=f"{INPUTS_DIR}/source-m.onnx", files={"source-m.onnx": b"m", "evaluation-e.npz": b"e"},
                  evaluation="evaluation-e.npz", min_cosine=0.98, input_shapes={"x": [1, 3, 48, 192]},
                  targets={**TARGETS, "small": {**TARGETS["cpu-arm64"], "maxModelSizeBytes": 5000}})
    for name, data in inputs_files(req).items():
        (tmp_path / name).write_bytes(data)
    args = render_compile_job(req, settings)["spec"]["template"]["spec"]["containers"][0]["args"]
    seen = []

    class Seen(Exception):
        pass

    def compile_model(got, **_):
        seen.append(got)
        raise Seen

    monkeypatch.setattr(core, "compile_model", compile_model)
    result = CliRunner().invoke(compile_command, [a.replace(INPUTS_DIR, str(tmp_path)) for a in args])
    assert isinstance(result.exception, Seen), result.output
    (got,) = seen
    moved = req.request.policy.evaluation.as_posix().replace(INPUTS_DIR, str(tmp_path))
    assert got.policy == replace(req.request.policy, evaluation=Path(moved))
    assert got.targets == req.request.targets and got.targets["small"].max_model_size_bytes == 5000
    assert (got.digest, got.name) == (req.request.digest, req.request.name)
    assert got.source == req.request.source.replace(INPUTS_DIR, str(tmp_path))


def test_boundary_compile_job_seals_its_report_with_a_key_only_its_pod_mounts(settings):
    """The Job's container gets its own report key (a Secret named after the Job, owned by it) and its binding
    (the Job's name); nothing else in the pod sees it."""
    job = render_compile_job(request(), settings)
    name = job["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[BINDING_ENV] == name and env[KEY_FILE_ENV] == f"{REPORT_KEY_DIR}/key"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == REPORT_KEY_DIR)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and volume["secret"]["secretName"] == report_key_secret(name)
    job["metadata"]["uid"] = "u-1"
    secret = render_report_key(job, b"\x01" * 32)
    assert secret["metadata"]["name"] == report_key_secret(name)
    assert secret["metadata"]["namespace"] == settings.namespace
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert bytes.fromhex(secret["stringData"]["key"]) == b"\x01" * 32
