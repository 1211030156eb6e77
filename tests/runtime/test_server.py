"""The real server over HTTP: OIP metadata/health, JSON and binary infer, tritonclient, metrics, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest


def _x(n=1, seed=0):
    return np.random.default_rng(seed).uniform(0, 16, (n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(digits):
    sess = ort.InferenceSession(str(digits[0]), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"input": x})[0]


def test_server_metadata_and_health(server, digits):
    assert server.request("GET", "/v2/health/live")[0] == 200
    assert server.request("GET", "/v2/health/ready")[0] == 200
    status, _, body = server.request("GET", "/v2")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "edgefleet-runtime" and "binary_tensor_data" in meta["extensions"]
    status, _, body = server.request("GET", "/v2/models/digits")
    meta = json.loads(body)
    assert status == 200
    assert meta["name"] == "digits"
    assert meta["versions"] == [digits[1].split(":")[1][:12]]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"][0]["name"] == "logits" and meta["outputs"][0]["shape"] == [-1, 10]
    assert server.request("GET", "/v2/models/digits/ready")[0] == 200
    assert server.request("GET", f"/v2/models/digits/versions/{meta['versions'][0]}/ready")[0] == 200


def test_json_infer_matches_onnxruntime(server, reference):
    x = _x(2)
    status, resp = server.infer_json(
        {"id": "r1", "inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x.tolist()}]}
    )
    assert status == 200, resp
    assert resp["id"] == "r1" and resp["model_name"] == "digits"
    out = resp["outputs"][0]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 10), reference(x), rtol=1e-5, atol=1e-5)


def test_binary_infer_matches_onnxruntime(server, reference):
    x = _x(3, seed=1)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = server.request(
        "POST",
        "/v2/models/digits/infer",
        header + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200, body
    hl = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:hl])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 3 * 10 * 4
    got = np.frombuffer(body[hl:], dtype="<f4").reshape(3, 10)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)


def test_tritonclient_round_trip(server, reference):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert client.get_model_metadata("digits")["inputs"][0]["name"] == "input"
    x = _x(4, seed=2)
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer("digits", [inp], outputs=[out], request_id="t1")
        np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)
        assert result.get_response()["id"] == "t1"
    client.close()


def test_metrics(server):
    server.infer_json({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]})
    server.infer_json({"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [0]}]})
    status, headers, body = server.request("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for needle in (
        'edgefleet_runtime_requests_total{code="200",endpoint="infer"}',
        'edgefleet_runtime_errors_total{code="400"}',
        "edgefleet_runtime_inference_seconds_bucket",
        "edgefleet_runtime_batch_size_bucket",
        "edgefleet_runtime_model_load_seconds",
        'edgefleet_runtime_model_info{backend="onnxruntime",digest="sha256:',
    ):
        assert needle in text, needle


def _tensor(**over):
    t = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    t.update(over)
    return t


BAD_JSON = [
    ("wrong-name", {"inputs": [_tensor(name="image")]}, 400, "unexpected input 'image'"),
    ("wrong-shape", {"inputs": [_tensor(shape=[1, 8, 8])]}, 400, "input 'input': shape [1,8,8]"),
    ("wrong-dim", {"inputs": [_tensor(shape=[1, 1, 8, 9], data=[0] * 72)]}, 400, "shape [1,1,8,9]"),
    ("wrong-dtype", {"inputs": [_tensor(datatype="FP64")]}, 400, "datatype FP64 does not match the model's FP32"),
    ("unknown-dtype", {"inputs": [_tensor(datatype="FLOAT")]}, 400, "datatype 'FLOAT'"),
    ("too-few-values", {"inputs": [_tensor(data=[0.5] * 63)]}, 400, "data has 63 values"),
    ("string-data", {"inputs": [_tensor(data=["a"] * 64)]}, 400, "not a valid FP32"),
    ("ragged-data", {"inputs": [_tensor(data=[[1, 2], [3]])]}, 400, "input 'input': data"),
    ("no-inputs", {"inputs": []}, 400, "'inputs'"),
    ("missing-data", {"inputs": [_tensor(data=None)]}, 400, "needs 'data'"),
    ("negative-dim", {"inputs": [_tensor(shape=[-1, 1, 8, 8])]}, 400, "shape must be a list of non-negative"),
    ("duplicate", {"inputs": [_tensor(), _tensor()]}, 400, "more than once"),
    ("unknown-output", {"inputs": [_tensor()], "outputs": [{"name": "probs"}]}, 400, "unknown output 'probs'"),
    ("not-object", [1, 2, 3], 400, "JSON object"),
    ("null-value", {"inputs": [_tensor(data=[None] + [0.5] * 63)]}, 400, "'input': data is not a valid FP32 list"),
    ("all-null", {"inputs": [_tensor(data=[None] * 64)]}, 400, "data[0] is null; FP32 needs numbers"),
    ("nan-string", {"inputs": [_tensor(data=[0.5] * 9 + ["NaN"] + [0.5] * 54)]}, 400, "data[9] is str 'NaN'"),
    ("inf-string", {"inputs": [_tensor(data=["Infinity"] * 64)]}, 400, "data[0] is str 'Infinity'"),
    ("numeric-string", {"inputs": [_tensor(data=["1.5"] * 64)]}, 400, "FP32 needs numbers"),
    ("bool-data", {"inputs": [_tensor(data=[True] * 64)]}, 400, "data[0] is bool 'True'"),
    ("nested-null", {"inputs": [_tensor(data=[[[[0.5] * 8] * 7 + [[None] * 8]]])]}, 400, "data[56] is null"),
    ("bool-among-numbers", {"inputs": [_tensor(data=[0.5] * 63 + [False])]}, 400, "data[63] is bool 'False'"),
    ("object-value", {"inputs": [_tensor(data=[{"v": 1}] * 64)]}, 400, "data[0] is dict"),
    ("fp32-overflow", {"inputs": [_tensor(data=[1e300] * 64)]}, 400, "beyond FP32's range"),
]


@pytest.mark.parametrize("case,payload,status,needle", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_json_input_is_4xx_naming_the_problem(server, case, payload, status, needle):
    got, body = server.infer_json(payload)
    assert got == status, body
    assert needle in body["error"], body


def _raw(server, path, body, headers):
    status, _, out = server.request("POST", path, body, headers)
    return status, json.loads(out)


def test_malformed_json(server):
    status, body = _raw(server, "/v2/models/digits/infer", b'{"inputs": [', {})
    assert status == 400 and "malformed JSON" in body["error"]


def test_body_over_limit(server):
    status, body = _raw(server, "/v2/models/digits/infer", b" " * (2 << 20), {})
    assert status == 413 and "--max-body-bytes" in body["error"]
    assert server.request("GET", "/v2/health/live")[0] == 200


def test_unknown_model(server):
    status, body = server.infer_json({"inputs": [_tensor()]}, name="nope")
    assert status == 404 and "unknown model 'nope'" in body["error"]
    assert server.request("GET", "/v2/models/nope")[0] == 404
    status, _, out = server.request("GET", "/v2/models/digits/versions/999")
    assert status == 404 and "no version '999'" in json.loads(out)["error"]


def test_binary_size_mismatch(server):
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 100}}
            ]
        }
    ).encode()
    status, body = _raw(
        server, "/v2/models/digits/infer", header + b"\0" * 100, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 400 and "binary_data_size 100" in body["error"]
    status, body = _raw(server, "/v2/models/digits/infer", header, {"Inference-Header-Content-Length": "99999"})
    assert status == 400 and "Inference-Header-Content-Length" in body["error"]


def test_wrong_method_and_route(server):
    assert server.request("GET", "/v2/models/digits/infer")[0] == 405
    status, _, body = server.request("GET", "/v3/nothing")
    assert status == 404 and "no route" in json.loads(body)["error"]
