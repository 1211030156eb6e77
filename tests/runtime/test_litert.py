"""LiteRT backend through the real server: an int8 model quantized/dequantized at the edges."""

from __future__ import annotations

import json

import models
import numpy as np
import pytest
from conftest import REPO_FIXTURES

pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")


def test_int8_tflite_served_over_http(start_server, tmp_path):
    path, reference = models.int8_tflite(tmp_path / "fc_int8.tflite")
    s = start_server(path, models.sha256(path), name="fc")
    meta = json.loads(s.request("GET", "/v2/models/fc")[2])
    assert meta["platform"] == "tensorflow_lite"
    # int8 tensors are exposed as FP32: the server quantizes inputs and dequantizes outputs
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 16]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 4]}]
    for seed in range(3):
        x = np.random.default_rng(seed).uniform(-1.5, 1.5, (1, 16)).astype(np.float32)
        status, resp = s.infer_json(
            {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
        )
        assert status == 200, resp
        np.testing.assert_allclose(np.array(resp["outputs"][0]["data"]).reshape(1, 4), reference(x), atol=1e-6)
    status, resp = s.infer_json({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [0.0] * 32}]})
    assert status == 400 and "shape [2,16]" in resp["error"]


PALM = REPO_FIXTURES / "palm_detection_lite.tflite"


@pytest.mark.skipif(not PALM.exists(), reason="tests/fixtures/models/palm_detection_lite.tflite is not committed")
def test_real_tflite_fixture_binary_infer(start_server):
    s = start_server(PALM, models.sha256(PALM), name="palm")
    meta = json.loads(s.request("GET", "/v2/models/palm")[2])
    (inp,) = meta["inputs"]
    shape = inp["shape"]
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {"name": inp["name"], "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    status, headers, body = s.request(
        "POST", "/v2/models/palm/infer", header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 200, body[:300]
    hl = int(headers["Inference-Header-Content-Length"])
    outs = json.loads(body[:hl])["outputs"]
    assert len(outs) == len(meta["outputs"])
    assert sum(o["parameters"]["binary_data_size"] for o in outs) == len(body) - hl


def test_missing_delegate_falls_back_to_cpu_only_when_the_image_allows_it(tmp_path, monkeypatch):
    from edgefleet_runtime.backends import DELEGATE_OPTIONAL_ENV, ModelLoadError, open_backend

    path, reference = models.int8_tflite(tmp_path / "fc_int8.tflite")
    monkeypatch.delenv(DELEGATE_OPTIONAL_ENV, raising=False)
    with pytest.raises(ModelLoadError, match="libnot-a-delegate.so"):
        open_backend(str(path), delegate="libnot-a-delegate.so")
    monkeypatch.setenv(DELEGATE_OPTIONAL_ENV, "true")
    backend = open_backend(str(path), delegate="libnot-a-delegate.so")
    assert backend.describe()["delegate"] is None
    assert "running on the CPU" in backend.describe()["delegateFallback"]
    x = np.zeros((1, 16), np.float32)
    np.testing.assert_allclose(backend.run({"x": x}, ["y"])["y"], reference(x), atol=1e-6)
