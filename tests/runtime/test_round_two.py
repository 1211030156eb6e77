"""Issue 23, the runtime's second hardening round: each class of hostile input, over REST and gRPC where both apply."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------------------ memory
def _any_server(start_server, tmp_path, *extra, datatype="FP32"):
    from models import sha256
    from onnx import TensorProto, helper

    path = tmp_path / f"any-{datatype}.onnx"
    elem = {"FP32": TensorProto.FLOAT, "BYTES": TensorProto.STRING}[datatype]
    graph = helper.make_graph(
        [helper.make_node("Shape", ["input"], ["shape"])], "any",
        [helper.make_tensor_value_info("input", elem, ["N", "M"])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    port = free_port()
    s = start_server(path, sha256(path), "--grpc-port", str(port), *extra, name="any")
    s.grpc_port = port
    return s


def test_boundary_binary_bytes_tensors_count_at_their_decoded_size(start_server, tmp_path):
    """24 concurrent 30 MB binary BYTES bodies of 1-byte elements (6 M elements each, many times larger once
    decoded): refused 413/503 for what the memory budget cannot hold; RSS grows less than 450 MiB."""
    import struct

    from test_attacks import PeakRss, concurrently

    s = _any_server(start_server, tmp_path, datatype="BYTES")
    n = 6_000_000
    blob = struct.pack("<I", 1) + b"x"
    blob *= n
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, n], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    request = (b"POST /v2/models/any/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: %d\r\n"
               b"Content-Length: %d\r\n\r\n" % (len(head), len(head) + len(blob))) + head + blob
    statuses: list[int] = []

    def attack():
        try:
            out = exchange(s.port, request, timeout=120, watch=True)
        except OSError:
            out = b""
        statuses.append(status_of(out) if out else 0)

    with PeakRss(s.proc.pid, every=0.01) as rss:
        concurrently([attack] * 24, timeout=180)
    assert set(statuses) <= {413, 503} and len(statuses) == 24, statuses
    assert rss.peak - rss.base < 450, f"RSS grew from {rss.base:.0f} to {rss.peak:.0f} MiB"
    small = head.replace(b"%d" % n, b"2").replace(b"%d" % len(blob), b"10")
    body = small + b"\x01\x00\x00\x00a\x01\x00\x00\x00b"
    out = exchange(s.port, b"POST /v2/models/any/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: %d\r\n"
                   b"Content-Length: %d\r\n\r\n" % (len(small), len(body)) + body)
    assert status_of(out) == 200, out[:300]
    print(f"RSS {rss.base:.0f} MiB -> peak {rss.peak:.0f} MiB; statuses {sorted(set(statuses))}")


def test_boundary_concurrent_large_grpc_messages_share_the_memory_budget(start_server, tmp_path):
    """24 concurrent ~30 MB gRPC messages: RSS grows less than 450 MiB (messages wait for a receiving thread under
    HTTP/2 flow control instead of being buffered). With REST bodies holding the shared budget, a large message
    gets RESOURCE_EXHAUSTED naming it; a small call is still served."""
    import grpc
    from edgefleet_runtime.grpcserver import pb
    from test_attacks import PeakRss, concurrently

    s = _any_server(start_server, tmp_path)
    m = 7_500_000
    req = pb.ModelInferRequest(model_name="any", raw_input_contents=[np.zeros(m, np.float32).tobytes()])
    req.inputs.add(name="input", datatype="FP32", shape=[1, m])
    codes: list[str] = []

    def attack():
        try:
            _grpc_call(s.grpc_port, req)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)

    with PeakRss(s.proc.pid, every=0.01) as rss:
        concurrently([attack] * 24, timeout=180)
    print(f"RSS {rss.base:.0f} MiB -> peak {rss.peak:.0f} MiB; codes {sorted(set(codes))}")
    assert len(codes) == 24 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert rss.peak - rss.base < 450, f"RSS grew from {rss.base:.0f} to {rss.peak:.0f} MiB"

    holders = []  # REST bodies announced (30 MB of binary each), not sent: they hold 240 of the 256 MiB budget
    for _ in range(8):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.sendall(b"POST /v2/models/any/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: 100\r\n"
                  b"Content-Length: 30000000\r\n\r\n")
        holders.append(c)
    time.sleep(0.3)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _grpc_call(s.grpc_port, req)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "too many requests in flight" in err.value.details()
        assert metric(s, "edgefleet_runtime_refused_total", reason="memory_budget") == 1
    finally:
        for c in holders:
            c.close()
    small = pb.ModelInferRequest(model_name="any", raw_input_contents=[np.zeros(3, np.float32).tobytes()])
    small.inputs.add(name="input", datatype="FP32", shape=[1, 3])
    assert list(np.frombuffer(_grpc_call(s.grpc_port, small).raw_output_contents[0], "<i8")) == [1, 3]


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_on_every_transport(reduce_server, bad):
    """As in JSON: the binary extension, gRPC raw_input_contents and gRPC fp32_contents refuse them (400 /
    INVALID_ARGUMENT naming the input)."""
    from edgefleet_runtime.grpcserver import pb

    s = reduce_server
    x = np.float32([1.0, bad])
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    out = exchange(s.port, b"POST /v2/models/reduce/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: "
                   b"%d\r\nContent-Length: %d\r\n\r\n" % (len(head), len(head) + 8) + head + x.tobytes())
    assert status_of(out) == 400 and b"input 'input'" in out and b"finite" in out, out[:300]
    raw = pb.ModelInferRequest(model_name="reduce", raw_input_contents=[x.tobytes()])
    typed = pb.ModelInferRequest(model_name="reduce")
    for req in (raw, typed):
        t = req.inputs.add(name="input", datatype="FP32", shape=[1, 2])
        if req is typed:
            t.contents.fp32_contents.extend(x.tolist())
        code, details = _grpc_error(s.grpc_port, req)
        assert code.name == "INVALID_ARGUMENT" and "input 'input'" in details and "finite" in details, details


def test_nan_outputs_never_reach_the_confidence_metric_or_hard_examples():
    """A model can still answer NaN for finite inputs: such rows are left out of the monitor's statistics."""
    from edgefleet_runtime.monitor import Monitor

    offered = []

    class Spool:  # what Monitor asks of HardExamples: its threshold and offer()
        below = None

        def offer(self, model, feeds, results, confs, rows):
            offered.append(rows)

    class Model:
        backend = type("B", (), {"outputs": [type("T", (), {"name": "logits"})]})

    m = Monitor(hard_examples=Spool())
    feeds = {"input": np.zeros((1, 4), np.float32)}
    for out in (np.float32([[np.nan, 0.0, 1.0]]), np.float32([[np.inf, 0.0, 1.0], [0.1, 0.2, 5.0]])):
        m.observe(Model(), feeds, {"logits": out})
    hist = next(f for f in m.collect() if f.name == "edgefleet_runtime_prediction_confidence")
    total = next(x.value for x in hist.samples if x.name.endswith("_sum"))
    count = next(x.value for x in hist.samples if x.name.endswith("_count"))
    assert np.isfinite(total) and count == 1, (total, count)  # only the finite row counted
    assert m.errors == 0 and offered == [], offered


# ------------------------------------------------------------------------------------------ model files
def _external_model(folder, location: str):
    """input [1, 4] + a weight initializer whose 16 bytes live at ``location`` (ONNX external data)."""
    from models import sha256
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [0.0] * 4)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "w"], ["out"])], "ext",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, sha256(path)


@pytest.mark.parametrize("case", ["inside", "relative-parent", "absolute", "symlink"])
def test_boundary_onnx_external_data_is_refused_at_load(start_server, tmp_path, case):
    """External data is not covered by the variant's digest: a model that names any (a file beside it, '..', an
    absolute path, a symlink to a Secret's file) is refused at load, with the initializer and the location."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"S3CRET-TOKEN-ABCD")
    folder = tmp_path / "variant"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"\0" * 16)
    (folder / "link.bin").symlink_to(secret)
    location = {"inside": "w.bin", "relative-parent": "../secret", "absolute": str(secret), "symlink": "link.bin"}
    s = start_server(*_external_model(folder, location[case]), wait=False)
    assert s.proc.wait(30) == 4, s.logs()  # EXIT_LOAD
    logs = s.logs()
    assert "initializer 'w'" in logs and repr(location[case]) in logs and "digest" in logs, logs[-800:]


def test_boundary_openvino_ir_xml_needs_its_weights_under_the_digest(tmp_path):
    """A plain IR .xml's .bin beside it is not covered by the digest: refused when a digest is checked; the IR zip
    (model.xml + model.bin under one digest) is what is served."""
    from edgefleet_runtime.backends import ModelLoadError, open_backend
    from models import sha256

    xml = tmp_path / "model.xml"
    xml.write_bytes(b'<?xml version="1.0"?>\n<net name="x" version="11"><layers/></net>\n')
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not covered by the digest.*zip"):
        open_backend(str(xml), digest=sha256(xml))


# ------------------------------------------------------------------------------------------ encrypted envelopes
def _openssl_key(tmp_path, curve: str):
    """(private PEM path, public DER) on ``curve``, made by openssl (cryptography cannot make unsupported curves)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a key on a curve cryptography does not support")
    key = tmp_path / f"{curve}.pem"
    subprocess.run(["openssl", "ecparam", "-name", curve, "-genkey", "-noout", "-out", str(key)], check=True)
    der = subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True).stdout
    return key, der


def _envelope_on_curve(tmp_path, digits, curve: str):
    """The model encrypted for a P-256 key, its header's ephemeral key replaced by one on ``curve``; in a cache."""
    import base64
    import struct

    from conftest import make_cache
    from edgefleet_runtime import trust
    from models import sha256

    private, public = trust.generate_signing_key()
    (tmp_path / "enc.key").write_bytes(private)
    blob = trust.encrypt(digits[0].read_bytes(), trust.public_key_from_pem(public, "test"))
    start = len(trust.MAGIC) + 4
    (length,) = struct.unpack(">I", blob[len(trust.MAGIC) : start])
    header = json.loads(blob[start : start + length])
    header["epk"] = base64.b64encode(_openssl_key(tmp_path, curve)[1]).decode()
    text = json.dumps(header, separators=(",", ":")).encode()
    path = tmp_path / "bad.enc"
    path.write_bytes(trust.MAGIC + struct.pack(">I", len(text)) + text + blob[start + length :])
    cache = tmp_path / "cache"
    return cache, make_cache(cache, path, sha256(path)), sha256(path), tmp_path / "enc.key"


def test_boundary_envelope_key_on_an_unsupported_curve_is_a_clear_refusal(tmp_path, digits, monkeypatch,
                                                                          start_server):
    import http.client
    import subprocess
    import sys

    from edgefleet_runtime.exitcodes import EXIT_DECRYPT, EXIT_USAGE

    cache, link, digest, key = _envelope_on_curve(tmp_path, digits, "secp112r1")
    log = tmp_path / "termination-log"
    monkeypatch.setenv("EDGEFLEET_TERMINATION_LOG", str(log))

    def serve(*args):
        log.write_text("")
        return subprocess.run([sys.executable, "-m", "edgefleet_runtime.cli", "serve", "--port", "0", *map(str, args)],
                              capture_output=True, text=True, timeout=60)

    r = serve("--model", link, "--decryption-key-file", key)
    assert r.returncode == EXIT_DECRYPT and "Traceback" not in r.stderr, r.stderr
    assert "BadDecryption" in r.stderr and "ephemeral key" in log.read_text(), log.read_text()
    assert "unsupported curve" in log.read_text() and "P-256" in log.read_text(), log.read_text()
    bad_key, _ = _openssl_key(tmp_path, "secp112r1")
    r = serve("--model", digits[0], "--digest", digits[1], "--decryption-key-file", bad_key)
    assert r.returncode == EXIT_USAGE and "Traceback" not in r.stderr, r.stderr
    assert str(bad_key) in log.read_text() and "unsupported curve" in log.read_text(), log.read_text()

    from conftest import make_cache

    make_cache(cache, *digits, name="digits")
    mport = free_port()
    s = start_server(cache / "current" / "digits", None, "--cache", str(cache), "--management-port", str(mport),
                     "--decryption-key-file", key)
    c = http.client.HTTPConnection("127.0.0.1", mport, timeout=10)
    c.request("POST", "/v2/repository/models/digits/load", json.dumps({"parameters": {"digest": digest}}))
    resp = c.getresponse()
    body = json.loads(resp.read())
    c.close()
    assert resp.status == 403 and "BadDecryption" in body["error"] and "unsupported curve" in body["error"], body
    assert s.request("GET", "/v2/health/ready")[0] == 200
