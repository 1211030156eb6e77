"""Issue 23, the runtime's second hardening round: each class of hostile input, over REST and gRPC where both apply."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from conftest import free_port
from test_attacks import INFER, exchange, metric, status_of


# ------------------------------------------------------------------------------------------ connection cap
def test_bodies_that_stall_are_evicted_at_the_connection_cap(start_server, digits):
    """8 connections at a cap of 8 announce a body, send 10 bytes of it and stall: a probe is still answered
    (the longest-stalled body is evicted, as an idle or slow-header connection would be), not 503 until
    --body-timeout."""
    s = start_server(*digits, "--max-connections", "8", "--body-timeout", "30")
    stalled = []
    for _ in range(8):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.sendall(INFER + b"Content-Length: 4000\r\n\r\n" + b'{"inputs":')
        stalled.append(c)
    try:
        time.sleep(1.5)  # long enough for every body to count as stalled
        t0 = time.monotonic()
        out = exchange(s.port, b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status_of(out) == 200, out[:200]
        assert time.monotonic() - t0 < 2
        assert metric(s, "edgefleet_runtime_refused_total", reason="evicted_stalled_body") >= 1
    finally:
        for c in stalled:
            c.close()


# ------------------------------------------------------------------------------------------ numeric headers
def test_numeric_headers_take_ascii_digits_only(server):
    """'\\xb2' (superscript two) is a digit to str.isdigit and to int() a ValueError: 400 naming the header."""
    body = b'{"inputs":[]}'
    for header in (b"Inference-Header-Content-Length: \xb2", b"Inference-Header-Content-Length: \xd9\xa3",
                   b"Inference-Header-Content-Length: +5", b"Content-Length: \xb2"):
        framing = b"" if header.startswith(b"Content-Length") else b"Content-Length: %d\r\n" % len(body)
        out = exchange(server.port, INFER + header + b"\r\n" + framing + b"\r\n" + body)
        assert status_of(out) == 400, (header, out[:300])
        assert header.split(b":")[0] in out, out[:300]


# ------------------------------------------------------------------------------------------ shapes
def _reduce_model(path):
    """input [N, M] float -> ReduceSum over axis 0 -> [M]: an empty batch still gives an output of M values."""
    from models import sha256
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=0)],
        "reduce0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["M"])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path, sha256(path)


def _grpc_call(port, req, method="ModelInfer"):
    import grpc
    from edgefleet_runtime.grpcserver import pb

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(f"/inference.GRPCInferenceService/{method}",
                              request_serializer=pb.ModelInferRequest.SerializeToString,
                              response_deserializer=pb.ModelInferResponse.FromString)
        return call(req, timeout=30)


def _grpc_error(port, req):
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        _grpc_call(port, req)
    return err.value.code(), err.value.details()


@pytest.fixture
def reduce_server(start_server, tmp_path):
    port = free_port()
    s = start_server(*_reduce_model(tmp_path / "reduce.onnx"), "--grpc-port", str(port), name="reduce")
    s.grpc_port = port
    return s


def test_zero_sized_dimensions_do_not_hide_huge_ones(reduce_server):
    import grpc
    from edgefleet_runtime.grpcserver import pb

    s = reduce_server
    for shape in ([0, 2**62], [0, 40_000_000]):
        status, body = s.infer_json({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": []}],
                                     "outputs": [{"name": "total", "parameters": {"binary_data": True}}]},
                                    name="reduce")
        assert status in (400, 413) and "input 'input'" in body["error"], (shape, status, body)
        req = pb.ModelInferRequest(model_name="reduce", raw_input_contents=[b""])
        req.inputs.add(name="input", datatype="FP32", shape=shape)
        code, details = _grpc_error(s.grpc_port, req)
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (shape, code, details)
        assert details.startswith("input 'input'"), details
    status, body = s.infer_json({"inputs": [{"name": "input", "shape": [0, 3], "datatype": "FP32", "data": []}]},
                                name="reduce")
    assert status == 200 and body["outputs"][0]["data"] == [0, 0, 0]  # empty inputs within the bound still work


# ------------------------------------------------------------------------------------------ outputs
def test_an_output_requested_twice_or_too_many_outputs_is_refused(reduce_server):
    from edgefleet_runtime.grpcserver import pb

    s = reduce_server
    x = {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}
    for outputs, needle in (([{"name": "total"}] * 2, "requested"), ([{"name": "total"}] * 20_000, "20000 outputs")):
        status, body = s.infer_json({"inputs": [x], "outputs": outputs}, name="reduce")
        assert status == 400 and needle in body["error"] and "'reduce'" in body["error"], (status, body)
        req = pb.ModelInferRequest(model_name="reduce", raw_input_contents=[np.float32([1, 2]).tobytes()])
        req.inputs.add(name="input", datatype="FP32", shape=[1, 2])
        for o in outputs:
            req.outputs.add(name=o["name"])
        code, details = _grpc_error(s.grpc_port, req)
        assert code.name == "INVALID_ARGUMENT" and needle in details, (code, details)
