"""The runtime's seams: REST and gRPC decode into one InferRequest, one DataPlane runs it (encoded images and
top-k post-processing included), a typed ServeConfig is built from the flags (transform and TensorRT precision
included), and the Server lifecycle maps start-up failures to exit codes and drains on stop."""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest
from conftest import free_port, models
from edgefleet_runtime import grpcserver
from edgefleet_runtime.app import Metrics, ModelSlot
from edgefleet_runtime.cli import build_parser
from edgefleet_runtime.config import Limits, ModelOptions, ServeConfig
from edgefleet_runtime.dataplane import DataPlane, InferRequest, RequestedOutput
from edgefleet_runtime.exitcodes import EXIT_DIGEST, EXIT_USAGE
from edgefleet_runtime.grpcserver import pb
from edgefleet_runtime.preprocess import Transform
from edgefleet_runtime.protocol import decode_rest_request, encode_rest_response
from edgefleet_runtime.server import Server, StartupError
from edgefleet_runtime.tensors import RequestError


@pytest.fixture(scope="module")
def plane(digits):
    metrics = Metrics()
    slot = ModelSlot("digits", metrics, threads=1)
    slot.load(str(digits[0]), digits[1])
    return DataPlane(slot, metrics)


def _x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(n).uniform(0, 16, (n, 1, 8, 8)).astype(np.float32)


def _rest_json(x: np.ndarray) -> bytes:
    return json.dumps({"id": "r1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                               "data": x.ravel().tolist()}],
                       "outputs": [{"name": "logits"}]}).encode()  # fmt: skip


def _rest_binary(x: np.ndarray) -> tuple[bytes, int]:
    head = json.dumps({"id": "r1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                               "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    return head + x.tobytes(), len(head)


def _grpc_raw(x: np.ndarray):
    req = pb.ModelInferRequest(model_name="digits", id="r1", raw_input_contents=[x.tobytes()])
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.outputs.add(name="logits")
    return req


def _grpc_typed(x: np.ndarray):
    req = pb.ModelInferRequest(model_name="digits", id="r1")
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    req.outputs.add(name="logits")
    return req


def test_rest_and_grpc_decode_into_the_same_request(plane):
    x = _x()
    model = plane.model("digits", None)
    body, head = _rest_binary(x)
    decoded = [
        decode_rest_request(_rest_json(x), None, model),
        decode_rest_request(body, head, model),
        grpcserver.decode_request(_grpc_raw(x), model),
        grpcserver.decode_request(_grpc_typed(x), model),
    ]
    for r in decoded:
        assert isinstance(r, InferRequest) and r.model is model and r.id == "r1"
        assert list(r.inputs) == ["input"] and r.inputs["input"].dtype == np.float32
        np.testing.assert_array_equal(r.inputs["input"], x)
        assert [o.name for o in r.outputs] == ["logits"]
    assert [o.binary for o in decoded[1].outputs] == [True]  # REST's binary extension survives the decode


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"shape": [2, 1, 8, 9]}, "does not match the model's [-1,1,8,8]"),
        ({"name": "nope"}, "unexpected input 'nope' for model 'digits'"),
        ({"datatype": "INT32"}, "datatype INT32 does not match the model's FP32"),
    ],
)
def test_both_transports_refuse_alike(plane, change, needle):
    """One check, one message: the same bad tensor over REST and gRPC fails with the same text."""
    x = _x()
    model = plane.model("digits", None)
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist(), **change}
    with pytest.raises(RequestError) as rest:
        decode_rest_request(json.dumps({"inputs": [tensor]}).encode(), None, model)
    req = pb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
    req.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    with pytest.raises(RequestError) as grpc_err:
        grpcserver.decode_request(req, model)
    assert needle in rest.value.message and rest.value.message == grpc_err.value.message
    assert rest.value.status == grpc_err.value.status == 400


def test_nan_is_refused_on_every_transport(plane):
    x = _x()
    x[0, 0, 0, 0] = np.nan
    model = plane.model("digits", None)
    body, head = _rest_binary(x)
    for decode in (lambda: decode_rest_request(body, head, model),
                   lambda: grpcserver.decode_request(_grpc_raw(x), model)):  # fmt: skip
        with pytest.raises(RequestError, match="holds NaN or infinity"):
            decode()


def test_dataplane_infer_answers_what_was_asked(plane, digits):
    x = _x(3)
    model = plane.model("digits", None)
    resp = plane.infer(InferRequest(model, {"input": x}, [RequestedOutput("logits", binary=True)], "q"))
    want = ort.InferenceSession(str(digits[0]), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    assert (resp.model_name, resp.id, [o.name for o in resp.outputs]) == ("digits", "q", ["logits"])
    np.testing.assert_allclose(resp.outputs[0].data, want, rtol=1e-5, atol=1e-5)
    body, head = encode_rest_response(resp)  # the REST codec writes it back: JSON head + binary logits
    assert head is not None and json.loads(body[:head])["outputs"][0]["parameters"]["binary_data_size"] == 3 * 40
    out = grpcserver.encode_response(resp)
    np.testing.assert_allclose(np.frombuffer(out.raw_output_contents[0], "<f4").reshape(3, 10), want, rtol=1e-5)
    with pytest.raises(RequestError) as err:
        plane.model("other", None)
    assert err.value.status == 404 and "this server serves 'digits'" in err.value.message


def _config(argv: list[str], worker: int | None = None) -> ServeConfig:
    from edgefleet_runtime.cli import _limits

    args = build_parser().parse_args(["serve", *argv])
    return ServeConfig.from_args(args, "sha256:" + "a" * 64, _limits(args), worker)


def test_serve_config_is_typed_from_the_flags():
    c = _config(["--model", "m.onnx", "--name", "digits", "--grpc-port", "9000", "--threads", "2",
                 "--max-batch", "8", "--max-concurrency", "6", "--public-key", "k.pem", "--monitoring",
                 "--drift-window", "50", "--workers", "2"])  # fmt: skip
    assert (c.name, c.grpc_port, c.model_options.threads, c.model_options.max_batch) == ("digits", 9000, 2, 8)
    assert c.limits == Limits(max_concurrency=6) and c.trust.public_keys == ("k.pem",)
    assert c.monitoring.enabled and c.monitoring.drift_window == 50 and not c.management
    worker1 = _config(["--model", "m.onnx", "--grpc-port", "9000", "--max-concurrency", "6", "--workers", "2"], 1)
    assert worker1.grpc_port is None and worker1.limits == Limits(max_concurrency=6).shared_by(2)  # gRPC: worker 0
    assert _config(["--model", "m.onnx", "--grpc-port", "9000", "--workers", "2"], 0).grpc_port == 9000


def test_startup_failures_carry_their_exit_codes(digits, tmp_path):
    wrong = ServeConfig(model=str(digits[0]), digest="sha256:" + "0" * 64, host="127.0.0.1", port=0)
    with pytest.raises(StartupError) as err:
        Server(wrong).load()
    assert err.value.code == EXIT_DIGEST and "digest mismatch" in err.value.message
    (tmp_path / "bad.pem").write_text("not a key")
    from edgefleet_runtime.config import TrustOptions

    bad_key = ServeConfig(model=str(digits[0]), digest=digits[1], trust=TrustOptions((str(tmp_path / "bad.pem"),)))
    with pytest.raises(StartupError) as err:
        Server(bad_key).load()
    assert err.value.code == EXIT_USAGE and "bad.pem" in err.value.message


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_server_lifecycle_serves_then_drains(digits):
    server = Server(ServeConfig(model=str(digits[0]), digest=digits[1], name="digits", host="127.0.0.1", port=0))
    server.load()
    server.start()
    assert _get(server.port, "/v2/health/ready").startswith(b"HTTP/1.1 200")
    stop, hup = threading.Event(), threading.Event()
    loop = threading.Thread(target=server.run_until, args=(stop, hup))
    loop.start()
    stop.set()
    loop.join(10)
    assert not loop.is_alive()
    assert server.drain() is True
    assert server.plane is not None and not server.plane.ready  # reports not ready once draining
    with pytest.raises(OSError):
        _get(server.port, "/v2/health/live")  # the listener is closed


# ---------------------------------------------------------------- main's features through the seams
QUICKSTART = models.REPO / "examples" / "quickstart"
LABELS = [f"digit-{i}" for i in range(10)]
TRANSFORM = {"preprocessing": {"image": {"width": 8, "height": 8, "color": "GRAY", "layout": "NCHW"}},
             "postprocessing": {"softmax": True, "topK": 3, "labels": LABELS}}


def _png(x: np.ndarray) -> bytes:
    """One eval input (1x8x8 floats in 0..1) as an 8-bit grey PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(x[0] * 255), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_serve_config_carries_transform_and_precision(monkeypatch, digits):
    c = _config(["--model", "m.onnx", "--precision", "fp16"])
    assert c.model_options.precision == "fp16" and c.transform is None
    monkeypatch.setenv("EDGEFLEET_PRECISION", "int8")
    args = build_parser().parse_args(["serve", "--model", "m.onnx", "--transform", json.dumps(TRANSFORM)])
    from edgefleet_runtime.cli import _limits, _transform

    c = ServeConfig.from_args(args, digits[1], _limits(args), None, _transform(args))
    assert c.model_options.precision == "int8" and c.transform == Transform.from_json(json.dumps(TRANSFORM))
    # the Server hands both to the model slot: the transform is bound to the loaded model
    c = ServeConfig(model=str(digits[0]), digest=digits[1], name="digits", model_options=ModelOptions(
        threads=1, precision="fp32"), transform=c.transform)
    server = Server(c)
    server.load()
    assert server.slot is not None and server.slot.precision == "fp32" and server.slot.transform == c.transform
    model = server.slot.current
    assert model is not None and model.transform is not None and model.transform.output == "logits"
    assert list(model.encoded) == ["input"] and "topk_labels" in model.outputs


def test_a_bad_transform_is_a_usage_error(digits, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgefleet_runtime.cli", "serve", "--model", str(digits[0]),
                        "--digest", digits[1], "--port", "0", "--transform", "{not json"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == EXIT_USAGE and "--transform: not JSON" in r.stderr and "Traceback" not in r.stderr


def test_encoded_images_and_top_k_go_through_one_data_plane(start_server):
    """REST (BYTES tensor and image/png body) and gRPC (raw BYTES, typed bytes_contents, FP32) give the same top-k
    for the same images: one decode and one post-processing, in the data plane."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    x = np.load(QUICKSTART / "digits_eval.npz")["input"][:6]
    images = [_png(v) for v in x]
    x = (np.clip(np.rint(x * 255), 0, 255) / np.float32(255)).astype(np.float32)  # the pixels the PNGs hold
    port = free_port()
    model = QUICKSTART / "digits_cnn.onnx"
    s = start_server(model, models.sha256(model), "--grpc-port", str(port), "--transform", json.dumps(TRANSFORM),
                     "--precision", "fp32")
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    want_top = np.argsort(-want, axis=1, kind="stable")[:, :3]

    blob = b"".join(struct.pack("<I", len(b)) + b for b in images)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [len(images)],
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "topk_indices"}, {"name": "topk_labels"}]}).encode()  # fmt: skip
    status, _, out = s.request("POST", "/v2/models/digits/infer", head + blob,
                               {"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(head))})  # fmt: skip
    assert status == 200, out
    rest = {o["name"]: o["data"] for o in json.loads(out)["outputs"]}
    np.testing.assert_array_equal(np.reshape(rest["topk_indices"], (6, 3)), want_top)
    assert rest["topk_labels"][::3] == [LABELS[i] for i in want_top[:, 0]]
    status, _, out = s.request("POST", "/v2/models/digits/infer", images[0], {"Content-Type": "image/png"})
    assert status == 200, out
    assert {o["name"]: o["data"] for o in json.loads(out)["outputs"]}["topk_indices"] == list(want_top[0])

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert {o.name for o in client.get_model_metadata("digits").outputs} == {
        "logits", "topk_indices", "topk_scores", "topk_labels"}
    wanted = [grpcclient.InferRequestedOutput(n) for n in ("logits", "topk_indices", "topk_labels")]
    encoded = grpcclient.InferInput("input", [len(images)], "BYTES")
    encoded.set_data_from_numpy(np.array(images, dtype=object))  # raw_input_contents
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for inp in (encoded, tensor):
        result = client.infer("digits", [inp], outputs=wanted)
        np.testing.assert_array_equal(result.as_numpy("topk_indices"), want_top)
        assert [b.decode() for b in result.as_numpy("topk_labels")[:, 0]] == [LABELS[i] for i in want_top[:, 0]]
        np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-4, atol=1e-4)
    typed = pb.ModelInferRequest(model_name="digits")
    t = typed.inputs.add(name="input", datatype="BYTES", shape=[len(images)])
    t.contents.bytes_contents.extend(images)
    typed.outputs.add(name="topk_indices")
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=pb.ModelInferRequest.SerializeToString,
                              response_deserializer=pb.ModelInferResponse.FromString)  # fmt: skip
        resp = call(typed, timeout=10)
        np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], "<i8").reshape(6, 3), want_top)
        bad = pb.ModelInferRequest(model_name="digits", raw_input_contents=[struct.pack("<I", 5) + b"hello"])
        bad.inputs.add(name="input", datatype="BYTES", shape=[1])
        with pytest.raises(grpc.RpcError) as err:
            call(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in err.value.details()
    assert s.request("GET", "/v2/health/ready")[0] == 200
