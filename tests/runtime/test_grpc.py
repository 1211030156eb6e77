"""Open Inference Protocol v2 over gRPC, checked with tritonclient.grpc and against tritonclient's own proto."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from conftest import free_port

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def _x(n=1, seed=0):
    return np.random.default_rng(seed).uniform(0, 16, (n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(digits):
    sess = ort.InferenceSession(str(digits[0]), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"input": x})[0]


@pytest.fixture
def grpc_server(start_server, digits):
    def start(*extra):
        port = free_port()
        s = start_server(*digits, "--grpc-port", str(port), *extra)
        s.grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        return s

    return start


def _infer(client, x, name="input", datatype="FP32", model="digits"):
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("logits")], request_id="g1")


def test_health_metadata_and_infer(grpc_server, digits, reference):
    s = grpc_server()
    c = s.grpc
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits")
    assert not c.is_model_ready("nope")
    assert c.get_server_metadata().name == "edgefleet-runtime"
    meta = c.get_model_metadata("digits")
    assert meta.name == "digits" and meta.versions == [digits[1][7:19]]
    first = meta.inputs[0]
    assert (first.name, first.datatype, list(first.shape)) == ("input", "FP32", [-1, 1, 8, 8])
    for n in (1, 5):
        x = _x(n, seed=n)
        result = _infer(c, x)
        np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)
        resp = result.get_response()
        assert resp.id == "g1" and resp.model_version == digits[1][7:19]
    # REST and gRPC serve the same model from one process
    assert s.request("GET", "/v2/health/ready")[0] == 200
    metrics = s.request("GET", "/metrics")[2].decode()
    assert 'edgefleet_runtime_requests_total{code="200",endpoint="grpc"} 2.0' in metrics


def _call(s, req):
    """ModelInfer with our own message classes (what tritonclient cannot send)."""
    import grpc
    from edgefleet_runtime.grpcserver import pb

    with grpc.insecure_channel(s.grpc._channel._channel.target().decode()) as ch:
        call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        return call(req, timeout=10)


def test_typed_contents(grpc_server, reference):
    """Inputs in InferTensorContents (fp32_contents) instead of raw_input_contents."""
    from edgefleet_runtime.grpcserver import pb

    s = grpc_server()
    x = _x(2, seed=3)
    req = pb.ModelInferRequest(model_name="digits")
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    resp = _call(s, req)
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,code,needle",
    [
        ({"name": "image"}, "INVALID_ARGUMENT", "unexpected input 'image'"),
        ({"model": "nope"}, "NOT_FOUND", "unknown model 'nope'"),
        ({"x": np.zeros((1, 1, 8, 9), np.float32)}, "INVALID_ARGUMENT", "shape [1,1,8,9]"),
        ({"x": np.zeros((1, 1, 8, 8), np.float64), "datatype": "FP64"}, "INVALID_ARGUMENT", "does not match"),
    ],
)
def test_bad_requests_name_the_problem(grpc_server, kwargs, code, needle):
    s = grpc_server()
    x = kwargs.pop("x", _x())
    with pytest.raises(InferenceServerException) as err:
        _infer(s.grpc, x, **kwargs)
    assert code in str(err.value.status()) and needle in err.value.message()


def test_raw_size_mismatch_and_large_messages(grpc_server):
    import grpc
    from edgefleet_runtime.grpcserver import pb

    s = grpc_server("--max-batch", "8")
    req = pb.ModelInferRequest(model_name="digits", raw_input_contents=[b"\0" * 100])
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    with pytest.raises(grpc.RpcError) as rpc_err:
        _call(s, req)
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input': raw_input_contents has 100 bytes" in rpc_err.value.details()
    with pytest.raises(InferenceServerException) as err:
        _infer(s.grpc, _x(1024))  # far more than the model's inputs need at --max-batch 8
    # gRPC itself refuses it from the message's length prefix: the model's limit is its message limit
    assert "RESOURCE_EXHAUSTED" in str(err.value.status()) and "larger than max" in err.value.message()
    assert "vs. 86016" in err.value.message()  # 64 KiB + 8 x 64 values x 40 bytes: what the model can need
    metrics = s.request("GET", "/metrics")[2].decode()
    assert 'edgefleet_runtime_refused_total{reason="grpc_message_refused"} 1.0' in metrics


def test_messages_grpc_itself_refuses_are_counted(grpc_server):
    """Over --max-body-bytes gRPC refuses the message while it arrives, before our code sees it."""
    s = grpc_server("--max-body-bytes", "100000")
    with pytest.raises(InferenceServerException) as err:
        _infer(s.grpc, _x(1024))  # 262 kB of raw tensor
    assert "RESOURCE_EXHAUSTED" in str(err.value.status()), err.value
    metrics = s.request("GET", "/metrics")[2].decode()
    assert 'edgefleet_runtime_refused_total{reason="grpc_message_refused"} 1.0' in metrics
    assert np.asarray(_infer(s.grpc, _x(1)).as_numpy("logits")).shape == (1, 10)  # still serving


def test_calls_over_grpcios_queue_bound_are_counted(grpc_server):
    """--max-concurrency 1: 5 pool threads and grpcio's own bound of 20 calls in progress. 25 calls that hold
    back their message: grpcio refuses the last 5 itself (RESOURCE_EXHAUSTED), and /metrics counts them; the
    20 it admitted end without a message when their clients give up, also counted."""
    import grpc

    s = grpc_server("--max-concurrency", "1")
    channel = grpc.insecure_channel(s.grpc._channel._channel.target().decode())
    call = channel.stream_unary("/inference.GRPCInferenceService/ServerLive")  # unary on the server
    release = threading.Event()

    def no_message():
        release.wait(30)
        yield from ()

    calls = []
    for _ in range(25):
        calls.append(call.future(no_message(), timeout=60))
        time.sleep(0.02)  # in order: the first 20 fill grpcio's bound
    refused = [c for c in calls if c.done()]
    assert refused and all(c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused), refused
    release.set()
    codes = [c.code() for c in calls]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(refused)
    admitted = len(calls) - len(refused)
    want = [f'edgefleet_runtime_refused_total{{reason="grpc_queue_full"}} {len(refused)}.0',
            f'edgefleet_runtime_refused_total{{reason="grpc_message_refused"}} {admitted}.0']  # fmt: skip
    deadline = time.monotonic() + 10  # the server counts when its pool thread lets go, just after the answer
    while not all(w in (metrics := s.request("GET", "/metrics")[2].decode()) for w in want):
        assert time.monotonic() < deadline, [line for line in metrics.splitlines() if "refused_total" in line]
        time.sleep(0.05)
    channel.close()


def test_concurrency_limit_is_unavailable(grpc_server):
    s = grpc_server("--max-concurrency", "1", "--max-batch", "4096")
    x = _x(2048)
    codes: list[str] = []

    def client():
        c = grpcclient.InferenceServerClient(s.grpc._channel._channel.target().decode())
        for _ in range(8):
            try:
                _infer(c, x)
                codes.append("OK")
            except InferenceServerException as e:
                codes.append(str(e.status()))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert "OK" in codes and any("UNAVAILABLE" in c for c in codes), codes
    assert set(codes) <= {"OK", "StatusCode.UNAVAILABLE"}, codes
    metrics = s.request("GET", "/metrics")[2].decode()
    refused = sum("UNAVAILABLE" in c for c in codes)
    assert f'edgefleet_runtime_refused_total{{reason="concurrency"}} {refused}.0' in metrics


def test_messages_match_tritons_proto():
    """Every field we describe has the number, type and label of Triton's grpc_service.proto."""
    from edgefleet_runtime.grpcserver import MESSAGES, POOL
    from tritonclient.grpc import service_pb2

    for name in MESSAGES:
        ours = POOL.FindMessageTypeByName(f"inference.{name}")
        theirs = service_pb2.DESCRIPTOR.pool.FindMessageTypeByName(f"inference.{name}")
        for f in ours.fields:
            t = theirs.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (t.number, t.type, t.is_repeated), f"{name}.{f.name}"
            if f.message_type is not None:
                assert f.message_type.full_name == t.message_type.full_name, f"{name}.{f.name}"


def test_rendered_pod_serves_grpc(start_server, digits, reference):
    """runtime.grpcPort in an EdgeDeployment: the pod's args and ports as the operator renders them, served here."""
    import uuid

    from edgefleet.api import EdgeDeployment, Variant, builtin_profiles
    from edgefleet.render import render_class, render_service
    from edgefleet.render.workload import CACHE_MOUNT

    profiles = builtin_profiles()
    profile = next(p for p in profiles if p.metadata["name"] == "cpu-amd64")
    ed = EdgeDeployment(
        metadata={"name": "digits", "namespace": "default", "uid": str(uuid.uuid4())},
        spec={"modelRef": {"name": "digits"}, "runtime": {"grpcPort": 8081}},
    )
    variant = Variant(profile="cpu-amd64", artifact="oci://r/x@" + digits[1], digest=digits[1], state="Ready")
    serve = render_class(ed, profile, variant, profiles, CACHE_MOUNT)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "grpc", "containerPort": 8081, "protocol": "TCP"} in serve["ports"]
    assert "--grpc-port=8081" in serve["args"]
    service_ports = render_service(ed)["spec"]["ports"]
    assert {"name": "grpc", "port": 8081, "targetPort": "grpc", "protocol": "TCP"} in service_ports
    port = free_port()
    args = [a for a in serve["args"][1:] if not a.startswith(("--model=", "--digest=", "--name=", "--port="))]
    args = [f"--grpc-port={port}" if a.startswith("--grpc-port=") else a for a in args]
    s = start_server(*digits, *args)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    x = _x(3)
    np.testing.assert_allclose(_infer(client, x).as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)
    assert s.request("GET", "/v2/health/live")[0] == 200


def test_silent_sockets_are_closed_and_do_not_block_clients(grpc_server, reference):
    """32 TCP connections that never send the HTTP/2 preface: closed after --header-timeout; clients served."""
    import socket
    import time

    s = grpc_server("--header-timeout", "1")
    port = int(s.grpc._channel._channel.target().decode().rsplit(":", 1)[1])
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
    x = _x(2)
    np.testing.assert_allclose(_infer(s.grpc, x).as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)
    t0 = time.monotonic()
    closed = 0
    for sock in socks:
        while time.monotonic() - t0 < 6:
            sock.settimeout(max(0.01, 6 - (time.monotonic() - t0)))
            try:
                data = sock.recv(4096)  # the server's SETTINGS frame, then EOF
            except OSError:
                break
            if not data:
                closed += 1
                break
        sock.close()
    assert closed == len(socks) and time.monotonic() - t0 < 4
