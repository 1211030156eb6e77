"""Compile Jobs sign with the operator namespace's signing Secret (mounted by the kubelet) and encrypt for the
EdgeModel's public key (carried in the inputs ConfigMap); the rendered args run through the real CLI."""

from __future__ import annotations

import base64
from pathlib import Path

from click.testing import CliRunner
from edgefleet.api.compile import CompileRequest, CompileTarget, Policy
from edgefleet.compiler.cli import compile_command
from edgefleet.render.compile_job import (
    ENCRYPTION_FILE,
    INPUTS_DIR,
    SIGNING_DIR,
    CompileJobRequest,
    render_compile_inputs,
    render_compile_job,
)
from edgefleet.settings import Settings
from edgefleet_runtime import trust

DIGITS = Path(__file__).resolve().parent.parent / "fixtures" / "models" / "digits_cnn.onnx"
TARGET = {"cpu-amd64": {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime"}}


def _request(public_key: str | None) -> CompileJobRequest:
    request = CompileRequest(source=f"{INPUTS_DIR}/source-digits.onnx", name="digits",
                             targets={k: CompileTarget.model_validate(v) for k, v in TARGET.items()},
                             policy=Policy(quantization="none"))
    return CompileJobRequest(model_namespace="shop", generation=1, request=request,
                             files={"source-digits.onnx": DIGITS.read_bytes()}, encryption_public_key=public_key)


def test_job_without_trust_settings_has_no_trust_args_or_volumes():
    job = render_compile_job(_request(None), Settings(artifact_store="oci://r:5000/m"))
    pod = job["spec"]["template"]["spec"]
    assert not [a for a in pod["containers"][0]["args"] if "key-file" in a]
    # the report key and the registry token are not signing or encryption
    assert [v["name"] for v in pod["volumes"]] == ["inputs", "work", "report-key", "registry-token"]


def test_boundary_job_pushes_as_its_own_service_account_with_a_token_for_the_store_only():
    pod = render_compile_job(_request(None), Settings(artifact_store="oci://r:5000/m"))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "edgefleet-jobs" and pod["automountServiceAccountToken"] is False
    token = next(v for v in pod["volumes"] if v["name"] == "registry-token")["projected"]["sources"]
    assert token == [{"serviceAccountToken": {"audience": "edgefleet-registry", "expirationSeconds": 3600,
                                              "path": "token"}}]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["EDGEFLEET_REGISTRY_TOKEN_FILE"] == "/var/run/edgefleet/registry-token/token"
    off = render_compile_job(_request(None), Settings(artifact_store="oci://r:5000/m", registry_token_audience=""))
    assert "registry-token" not in [v["name"] for v in off["spec"]["template"]["spec"]["volumes"]]


def test_job_signs_and_encrypts_and_its_args_run(tmp_path):
    private, public = trust.generate_signing_key()
    sign_private, sign_public = trust.generate_signing_key()
    settings = Settings(artifact_store=str(tmp_path / "store"), signing_key_secret="edgefleet-signing",
                        compile_timing_runs=2)
    job = render_compile_job(_request(public.decode()), settings)
    plain_job = render_compile_job(_request(None), settings)
    assert job["metadata"]["name"] != plain_job["metadata"]["name"]  # a new key is a new Job
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert f"--encryption-key-file={INPUTS_DIR}/{ENCRYPTION_FILE}" in container["args"]
    assert f"--signing-key-file={SIGNING_DIR}/key" in container["args"]
    assert {"name": "signing-key", "mountPath": SIGNING_DIR, "readOnly": True} in container["volumeMounts"]
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "signing-key")
    assert volume["secret"]["secretName"] == "edgefleet-signing"

    # lay the inputs ConfigMap and the Secret out as the kubelet would, then run the rendered args
    job["metadata"]["uid"] = "1"
    inputs, signing = tmp_path / "inputs", tmp_path / "signing"
    inputs.mkdir()
    signing.mkdir()
    for name, data in render_compile_inputs(_request(public.decode()), job)["binaryData"].items():
        (inputs / name).write_bytes(base64.b64decode(data))
    (signing / "key").write_bytes(sign_private)
    args = [a.replace(INPUTS_DIR, str(inputs)).replace(SIGNING_DIR, str(signing)) for a in container["args"]]
    args = [a for a in args if not a.startswith(("--report=", "--cache-dir="))] + [
        f"--cache-dir={tmp_path / 'cache'}", "--quiet"]
    res = CliRunner().invoke(compile_command, args)
    assert res.exit_code == 0, res.output
    digest = res.output.split("\t")[3]
    blob = tmp_path / "store" / "sha256" / digest.split(":")[1]
    (tmp_path / "enc.key").write_bytes(private)
    (tmp_path / "sign.pub").write_bytes(sign_public)
    stored = blob.read_bytes()
    plain = trust.decrypt(stored, trust.load_decryption_key(tmp_path / "enc.key"))
    assert trust.is_encrypted(stored) and plain[:256] not in stored
    keys = trust.load_public_keys([tmp_path / "sign.pub"])
    assert trust.verify_digest(keys, digest, blob.with_name(blob.name + ".sig").read_text(), "v")


def test_a_rotated_encryption_key_is_a_new_compile_job():
    settings = Settings(artifact_store="oci://r:5000/m")
    first, second = trust.generate_signing_key()[1].decode(), trust.generate_signing_key()[1].decode()
    names = {render_compile_job(_request(k), settings)["metadata"]["name"] for k in (first, second, first)}
    assert len(names) == 2  # same key: the same Job (a restarted operator finds it); a new key: a new one
