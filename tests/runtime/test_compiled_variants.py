"""The compiler's artifacts, served by the runtime: every format ``edgefleet.compiler`` publishes.

Each variant is compiled from the committed fixtures into a LocalStore (same layout as the node
cache), served by ``edgefleet-runtime serve`` as a real subprocess, and its predictions over HTTP are
checked against the source model (onnxruntime / LiteRT in this process) on the evaluation set: they
agree at least as well as the compiler's report says. The tests may import the compiler; the runtime
package never does (import-linter).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_FIXTURES

pytest.importorskip("onnxruntime")
compiler = pytest.importorskip("edgefleet.compiler")
from edgefleet.artifacts import LocalStore  # noqa: E402

DIGITS = REPO_FIXTURES / "digits_cnn.onnx"
DIGITS_EVAL = REPO_FIXTURES / "digits_eval.npz"
DIGITS_CALIB = REPO_FIXTURES / "digits_calib.npz"
PALM = REPO_FIXTURES / "palm_detection_lite.tflite"
PALM_EVAL = REPO_FIXTURES / "palm_eval.npz"


def _digits_policy(**kw):
    return compiler.Policy(evaluation=DIGITS_EVAL, timingRuns=2, threads=1, **kw)


# case -> (source, target, policy, media type, the first bytes of the stored artifact)
CASES = {
    "onnx-pruned-gzip": (
        DIGITS,
        compiler.CompileTarget(format="onnx", precision="fp32", runtime="onnxruntime"),
        lambda: _digits_policy(quantization="none", sparsity=0.3),
        "application/vnd.edgefleet.model.onnx+gzip",
        b"\x1f\x8b",
    ),
    "openvino-int8-zip": (
        DIGITS,
        compiler.CompileTarget(format="openvino", precision="int8", runtime="openvino"),
        lambda: _digits_policy(calibration=DIGITS_CALIB),
        "application/vnd.edgefleet.model.openvino-ir+zip",
        b"PK\x03\x04",
    ),
    "onnx-int8": (
        DIGITS,
        compiler.CompileTarget(format="onnx", precision="int8", runtime="onnxruntime"),
        lambda: _digits_policy(quantization="dynamic-int8"),
        "application/vnd.edgefleet.model.onnx",
        b"",
    ),
    "tflite": (
        PALM,
        compiler.CompileTarget(format="tflite", precision="fp32", runtime="litert"),
        lambda: compiler.Policy(quantization="none", evaluation=PALM_EVAL, timingRuns=2, threads=1),
        "application/vnd.edgefleet.model.tflite",
        b"",
    ),
    # ONNX -> full-int8 .tflite (int8 in and out) for the coral-edgetpu profile, by onnx2tf + TensorFlow
    "tflite-from-onnx": (
        DIGITS,
        compiler.load_profiles(None)["coral-edgetpu"],
        lambda: _digits_policy(calibration=DIGITS_CALIB),
        "application/vnd.edgefleet.model.tflite",
        b"",
    ),
}
PLATFORM = {"onnx-pruned-gzip": "onnxruntime_onnx", "openvino-int8-zip": "openvino", "onnx-int8": "onnxruntime_onnx",
            "tflite": "tensorflow_lite", "tflite-from-onnx": "tensorflow_lite"}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def compiled(store_root, tmp_path_factory):
    """case -> (VariantReport, path of the stored artifact); compiled on first use."""
    store = LocalStore(store_root)
    cache = tmp_path_factory.mktemp("compile-cache")
    done: dict = {}

    def get(case: str):
        if case not in done:
            source, target, policy, _, _ = CASES[case]
            if case == "openvino-int8-zip":
                pytest.importorskip("openvino")
                pytest.importorskip("nncf")
            if case == "tflite-from-onnx":
                from edgefleet.compiler import tflite_convert

                if tflite_convert.missing():
                    pytest.skip(tflite_convert.missing())
            if case == "tflite":
                pytest.importorskip("ai_edge_litert")
                if not PALM.exists():
                    pytest.skip("tests/fixtures/models/palm_detection_lite.tflite is not committed")
            req = compiler.CompileRequest(str(source), {case: target}, policy())
            v = compiler.compile_model(req, store, cache).variants[case]
            assert v.state == "Ready", (v.reason, v.message)
            path = store_root / "sha256" / v.digest.split(":", 1)[1]
            assert v.artifact == path.as_uri()
            done[case] = (v, path)
        return done[case]

    return get


def _infer_binary(server, name: str, x: np.ndarray) -> list[np.ndarray]:
    """One request with the binary tensor data extension; FP32 outputs in the model's order."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    meta = json.loads(server.request("GET", f"/v2/models/{name}")[2])
    header = json.dumps(
        {
            "inputs": [{"name": meta["inputs"][0]["name"], "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    status, headers, body = server.request(
        "POST", f"/v2/models/{name}/infer", header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 200, body[:500]
    hl = int(headers["Inference-Header-Content-Length"])
    outs, pos = [], hl
    by_name = {}
    for o in json.loads(body[:hl])["outputs"]:
        n = o["parameters"]["binary_data_size"]
        assert o["datatype"] == "FP32", o
        by_name[o["name"]] = np.frombuffer(body[pos : pos + n], np.float32).reshape(o["shape"])
        pos += n
    assert pos == len(body)
    outs = [by_name[o["name"]] for o in meta["outputs"]]
    return outs


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 1.0)


def _ort_reference(x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(DIGITS), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_variant_served_over_http(case, compiled, start_server):
    v, path = compiled(case)
    _, _, _, media, magic = CASES[case]
    data = path.read_bytes()
    assert v.mediaType == media
    assert data.startswith(magic)
    assert v.digest == "sha256:" + hashlib.sha256(data).hexdigest()  # the digest covers the stored bytes
    assert v.metrics.samples > 0 and not v.metrics.synthetic

    s = start_server(path, v.digest, name="m")
    meta = json.loads(s.request("GET", "/v2/models/m")[2])
    assert meta["platform"] == PLATFORM[case]
    assert meta["versions"] == [v.digest.split(":")[1][:12]]

    if case == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        xs = np.load(PALM_EVAL)["input"]
        interp = Interpreter(model_path=str(PALM), num_threads=1)
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]
        cos = []
        for x in xs:
            x = x[None]
            interp.set_tensor(inp["index"], x)
            interp.invoke()
            ref = [interp.get_tensor(d["index"]) for d in interp.get_output_details()]
            got = _infer_binary(s, "m", x)
            assert len(got) == len(ref)
            flat = np.concatenate([g.reshape(1, -1) for g in got], axis=1)
            want = np.concatenate([r.reshape(1, -1) for r in ref], axis=1)
            cos.append(_cosines(flat, want)[0])
        assert float(np.mean(cos)) >= v.metrics.cosine - 1e-4, (np.mean(cos), v.metrics)
        assert float(np.min(cos)) >= v.metrics.minCosine - 1e-4, (np.min(cos), v.metrics)
        return

    ev = np.load(DIGITS_EVAL)
    x, y = ev["input"].astype(np.float32), ev["y"]
    assert v.metrics.samples == len(x)
    ref = _ort_reference(x)
    (got,) = _infer_binary(s, "m", x)  # the whole eval set as one batch
    assert got.shape == ref.shape
    agreement = float(np.mean(got.argmax(1) == ref.argmax(1)))
    accuracy = float(np.mean(got.argmax(1) == y))
    cos = _cosines(got, ref)
    assert agreement >= v.metrics.agreement - 1e-6, (agreement, v.metrics)
    assert accuracy >= v.metrics.accuracy - 1e-6, (accuracy, v.metrics)
    assert float(cos.mean()) >= v.metrics.cosine - 1e-4, (cos.mean(), v.metrics)
    # JSON tensors give the same answer as binary ones (one sample: dynamic int8 depends on the batch)
    status, resp = s.infer_json(
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x[0].ravel().tolist()}]},
        name="m",
    )
    assert status == 200, resp
    (one,) = _infer_binary(s, "m", x[:1])
    np.testing.assert_allclose(np.asarray(resp["outputs"][0]["data"], np.float32), one[0], rtol=1e-5, atol=1e-5)


def test_served_from_the_store_layout_without_digest_flag(compiled, start_server, store_root):
    """The LocalStore layout is the node cache's: ``--model STORE/sha256/<hex>`` is its own digest."""
    v, path = compiled("onnx-pruned-gzip")
    s = start_server(store_root / "sha256" / path.name, None, name="m")
    assert json.loads(s.request("GET", "/v2/models/m")[2])["versions"] == [path.name[:12]]


def test_gzip_digest_mismatch_refused_before_decompressing(compiled, tmp_path, start_server):
    v, path = compiled("onnx-pruned-gzip")
    raw = gzip.decompress(path.read_bytes())
    other = tmp_path / "other.onnx.gz"
    other.write_bytes(gzip.compress(raw, mtime=1))  # same model, other stored bytes
    s = start_server(other, v.digest, name="m", wait=False)
    assert s.proc.wait(30) == 3
    assert "digest mismatch" in s.logs()


def test_corrupt_packed_artifacts_fail_to_load(tmp_path, start_server, compiled):
    v, path = compiled("onnx-pruned-gzip")
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(path.read_bytes()[:200])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "no IR here")
    nozip = tmp_path / "noir.zip"
    nozip.write_bytes(buf.getvalue())
    for bad in (truncated, nozip):
        digest = "sha256:" + hashlib.sha256(bad.read_bytes()).hexdigest()
        s = start_server(bad, digest, name="m", wait=False)
        assert s.proc.wait(30) == 4, s.logs()
        assert "cannot load model" in s.logs()


def test_hot_swap_between_formats(compiled, start_server, store_root, tmp_path):
    """Load API: plain ONNX -> gzip'd ONNX -> OpenVINO zip, all from the store/cache layout."""
    pytest.importorskip("openvino")
    first, p1 = compiled("onnx-int8")
    token = tmp_path / "token"
    token.write_text("k" * 32)
    s = start_server(p1, first.digest, "--cache", str(store_root), "--management-token-file", str(token), name="m")
    x = np.load(DIGITS_EVAL)["input"][:16].astype(np.float32)
    ref = _ort_reference(x).argmax(1)
    for case in ("onnx-pruned-gzip", "openvino-int8-zip"):
        v, _ = compiled(case)
        status, _, body = s.request(
            "POST", "/v2/repository/models/m/load", json.dumps({"parameters": {"digest": v.digest}}).encode(),
            {"Content-Type": "application/json", "Authorization": "Bearer " + "k" * 32},
        )
        assert status == 200, body
        assert json.loads(body)["digest"] == v.digest
        assert json.loads(s.request("GET", "/v2/models/m")[2])["platform"] == PLATFORM[case]
        (got,) = _infer_binary(s, "m", x)
        assert np.mean(got.argmax(1) == ref) >= 0.9


def test_unpack_limit_guards_against_bombs(tmp_path):
    from edgefleet_runtime.backends import ModelLoadError, open_source

    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(gzip.compress(b"\0" * (1 << 20)))
    with pytest.raises(ModelLoadError, match="more than"):
        open_source(bomb, limit=1 << 16)
    assert open_source(bomb, limit=1 << 21).data == b"\0" * (1 << 20)


def test_openvino_image_serves_gzipped_onnx(compiled, start_server):
    """The OpenVINO image sets EDGEFLEET_BACKEND=openvino: the ONNX unpacked in memory goes to OpenVINO."""
    pytest.importorskip("openvino")
    v, path = compiled("onnx-pruned-gzip")
    s = start_server(path, v.digest, "--backend", "openvino", name="m")
    assert json.loads(s.request("GET", "/v2/models/m")[2])["platform"] == "openvino"
    x = np.load(DIGITS_EVAL)["input"].astype(np.float32)
    (got,) = _infer_binary(s, "m", x)
    assert np.mean(got.argmax(1) == _ort_reference(x).argmax(1)) >= v.metrics.agreement - 1e-6
