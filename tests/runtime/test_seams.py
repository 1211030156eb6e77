"""The runtime's seams: REST and gRPC decode into one InferRequest, one DataPlane runs it, a typed ServeConfig is
built from the flags, and the Server lifecycle maps start-up failures to exit codes and drains on stop."""

from __future__ import annotations

import json
import socket
import threading

import numpy as np
import onnxruntime as ort
import pytest
from edgefleet_runtime import grpcserver
from edgefleet_runtime.app import Metrics, ModelSlot
from edgefleet_runtime.cli import build_parser
from edgefleet_runtime.config import Limits, ServeConfig
from edgefleet_runtime.dataplane import DataPlane, InferRequest, RequestedOutput
from edgefleet_runtime.exitcodes import EXIT_DIGEST, EXIT_USAGE
from edgefleet_runtime.grpcserver import pb
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
