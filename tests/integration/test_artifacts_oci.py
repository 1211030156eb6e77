"""The OCI store against the dev cluster's registry (CNCF distribution, plain http)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from edgefleet.artifacts import DigestError, OCIStore
from edgefleet.compiler import CompileRequest, CompileTarget, Policy, compile_model

pytestmark = pytest.mark.cluster
M = Path(__file__).resolve().parent.parent / "fixtures" / "models"
CPU = CompileTarget(format="onnx", precision="int8", runtime="onnxruntime", execution_provider="cpu")


@pytest.fixture
def store(cluster):
    return OCIStore(cluster.registry, f"edgefleet-test/{uuid.uuid4().hex[:8]}", insecure=True)


def test_push_pull_verify_with_annotations(store):
    data = b"\x08\x07" + uuid.uuid4().bytes * 100
    ref = store.put(data, name="m-cpu", media_type="application/vnd.edgefleet.model.onnx",
                    annotations={"io.edgefleet.profile": "cpu"}, filename="model.onnx")
    assert ref.ref.startswith(f"oci://{store.registry}/") and "@sha256:" in ref.ref
    assert ref.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.get(ref.ref, ref.digest) == data
    ann = store.annotations(ref.ref)
    assert ann["io.edgefleet.profile"] == "cpu" and ann["io.edgefleet.digest"] == ref.digest
    with pytest.raises(DigestError):
        store.get(ref.ref, "sha256:" + "0" * 64)


def test_compile_publishes_to_registry_and_compiles_from_it(store, tmp_path):
    req = CompileRequest(str(M / "digits_cnn.onnx"), {"cpu": CPU},
                         Policy(calibration=M / "digits_calib.npz", evaluation=M / "digits_eval.npz", timingRuns=3))
    v = compile_model(req, store, tmp_path / "c1").variants["cpu"]
    assert v.state == "Ready" and v.artifact.startswith("oci://")
    ann = store.annotations(v.artifact)
    assert ann["io.edgefleet.candidate"] == v.chosen and ann["io.edgefleet.sizeBytes"] == str(v.sizeBytes)
    assert hashlib.sha256(store.get(v.artifact, v.digest)).hexdigest() == v.digest.split(":")[1]
    # an oci:// source with its expected digest
    src = store.put((M / "digits_cnn.onnx").read_bytes(), name="source", media_type="application/onnx",
                    filename="digits_cnn.onnx")
    again = compile_model(CompileRequest(src.ref, req.targets, Policy(quantization="none", timingRuns=2),
                                         digest=src.digest), None, tmp_path / "c2")
    assert again.sourceDigest == src.digest and again.variants["cpu"].state == "Ready"
