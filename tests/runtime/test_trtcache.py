"""TensorRT execution provider options: precision flags, and engine/timing caches keyed so that an engine built
for one TensorRT/CUDA/GPU is never loaded on another. No GPU here: the options and keys are tested as values, and
the backend's wiring by asking ONNX Runtime for TensorRT and recording what it was given."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgefleet_runtime import backends, trtcache
from onnx import TensorProto, helper, numpy_helper

H100 = trtcache.GpuStack(tensorrt="10.3.0", cuda="12.6", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
ORIN = trtcache.GpuStack(tensorrt="10.3.0", cuda="12.6", gpu="Orin (nvgpu)", compute_capability="8.7",
                         jetpack="R36.4.0")
DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


@pytest.mark.parametrize("change", [
    {"tensorrt": "10.4.0"}, {"tensorrt": "8.6.1"}, {"cuda": "12.4"}, {"gpu": "NVIDIA H100 NVL"},
    {"compute_capability": "8.9"}, {"jetpack": "R36.3.0"},
])
def test_every_part_of_the_stack_changes_the_engine_and_timing_keys(change):
    other = replace(H100, **change)
    assert trtcache.engine_key(DIGEST, other) != trtcache.engine_key(DIGEST, H100)
    assert trtcache.timing_key(other) != trtcache.timing_key(H100)


def test_the_engine_key_is_stable_names_its_parts_and_changes_with_the_variant():
    key = trtcache.engine_key(DIGEST, H100)
    assert key == trtcache.engine_key(DIGEST, replace(H100))
    assert key.startswith("abababababab-trt10.3.0-cuda12.6-sm9.0-")
    assert trtcache.engine_key(OTHER, H100) != key
    assert "/" not in trtcache.engine_key(DIGEST, replace(H100, gpu="a/../../b", tensorrt="../x"))
    with pytest.raises(ValueError, match="sha256:<64 hex>"):
        trtcache.engine_key("sha256:abc", H100)


@pytest.mark.parametrize("precision, fp16, int8", [("fp32", "False", "False"), ("fp16", "True", "False"),
                                                    ("int8", "True", "True")])
def test_precision_flags(precision, fp16, int8):
    opts = trtcache.provider_options(precision, None, None, None)
    assert opts == {"trt_fp16_enable": fp16, "trt_int8_enable": int8}  # no cache without a place and a key


def test_caches_live_under_the_node_cache_one_engine_folder_per_variant_and_gpu(tmp_path):
    h100 = trtcache.provider_options("fp16", tmp_path, DIGEST, H100)
    orin = trtcache.provider_options("fp16", tmp_path, DIGEST, ORIN)
    other_model = trtcache.provider_options("fp16", tmp_path, OTHER, H100)
    assert h100["trt_engine_cache_enable"] == h100["trt_timing_cache_enable"] == "True"
    engine = Path(h100["trt_engine_cache_path"])
    assert engine.parent == tmp_path / "tensorrt" and engine.name == trtcache.engine_key(DIGEST, H100)
    engines = {o["trt_engine_cache_path"] for o in (h100, orin, other_model)}
    assert len(engines) == 3
    assert other_model["trt_timing_cache_path"] == h100["trt_timing_cache_path"]  # tactic timings: per GPU stack
    assert orin["trt_timing_cache_path"] != h100["trt_timing_cache_path"]
    assert trtcache.prepare(h100) == (h100, "")
    assert engine.is_dir() and Path(h100["trt_timing_cache_path"]).is_dir()


@pytest.mark.parametrize("stack, digest", [(replace(H100, gpu=""), DIGEST), (replace(H100, tensorrt=""), DIGEST),
                                           (H100, None)])
def test_no_cache_when_the_key_would_miss_a_part(tmp_path, stack, digest):
    opts = trtcache.provider_options("fp16", tmp_path, digest, stack)
    assert "trt_engine_cache_enable" not in opts and "trt_timing_cache_path" not in opts


def test_auto_is_not_a_flag():
    with pytest.raises(ValueError, match="fp32, fp16 or int8"):
        trtcache.provider_options("auto", None, None, None)


def tiny(weight_type: int = TensorProto.FLOAT, qdq: bool = False) -> bytes:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32 if weight_type == TensorProto.FLOAT else np.float16), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [w]
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.uint8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                 helper.make_node("MatMul", ["d", "w"], ["y"])]
    t = weight_type
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, [1, 4])],
                          [helper.make_tensor_value_info("y", t, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def test_the_served_model_decides_the_precision():
    assert trtcache.model_precision(tiny()) == "fp32"
    assert trtcache.model_precision(tiny(TensorProto.FLOAT16)) == "fp16"
    assert trtcache.model_precision(tiny(qdq=True)) == "int8"


def test_jetpack_release_and_a_gpu_less_host(tmp_path):
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64\n")
    assert trtcache._jetpack(str(f)) == "R36.4.0"
    assert trtcache._jetpack(str(tmp_path / "missing")) == ""
    here = trtcache.detect()  # this host has no GPU: incomplete, so no engine cache would be keyed on it
    assert not here.complete()


@pytest.fixture
def given(monkeypatch) -> list:
    """ONNX Runtime is asked for TensorRT (as on a GPU node with the ORIN stack); the providers it was given are
    recorded and the session opened on CPU, since this host has no TensorRT."""
    given: list = []
    real = ort.InferenceSession

    def session(model, sess_options=None, providers=None):
        given.append(providers)
        return real(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(trtcache, "detect", lambda: ORIN)
    return given


def test_the_bench_job_builds_the_engine_where_serve_finds_it(tmp_path, given):
    from edgefleet_runtime import bench

    model = tmp_path / "m.onnx"
    model.write_bytes(tiny(TensorProto.FLOAT16))
    digest = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    bench._open(str(model), bench.Options(execution_provider="tensorrt", cache_dir=str(tmp_path / "c")), 1)
    backends.open_backend(str(model), execution_provider="tensorrt", digest=digest, data=model.read_bytes(),
                          packaging="file", cache_dir=str(tmp_path / "c"))  # what serve does after its fetch
    (_, by_bench), (_, by_serve) = given[0][0], given[1][0]
    assert by_bench == by_serve and by_bench["trt_engine_cache_path"].endswith(trtcache.engine_key(digest, ORIN))
    opts = bench.Options(execution_provider="tensorrt", cache_dir=str(tmp_path / "c"), runs=2, threads_n=1)
    report = bench.measure(str(model), {"x": np.ones((2, 4), np.float16)}, opts)  # the bench report says it
    assert report["tensorrt"]["engineCache"] == by_bench["trt_engine_cache_path"]
    assert report["tensorrt"]["precision"] == "fp16" and report["tensorrt"]["stack"]["gpu"] == "Orin (nvgpu)"


def test_the_backend_hands_tensorrt_the_flags_and_caches(tmp_path, given):
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny(TensorProto.FLOAT16))
    b = backends.open_backend(str(model), execution_provider="tensorrt", digest=None,
                              data=model.read_bytes(), packaging="file", cache_dir=str(tmp_path / "cache"))
    name, opts = given[0][0]
    assert name == "TensorrtExecutionProvider" and given[0][1:] == ["CPUExecutionProvider"]
    assert opts["trt_fp16_enable"] == "True" and "trt_engine_cache_path" not in opts  # no digest, no cache
    assert b.describe()["tensorrt"]["precision"] == "fp16"
    digest = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    b = backends.open_backend(str(model), execution_provider="tensorrt", digest=digest, data=model.read_bytes(),
                              packaging="file", cache_dir=str(tmp_path / "cache"), precision="int8")
    _, opts = given[1][0]
    assert opts["trt_int8_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "cache" / "tensorrt" / trtcache.engine_key(digest, ORIN))
    assert Path(opts["trt_engine_cache_path"]).is_dir()
    assert b.describe()["tensorrt"]["engineCache"] == opts["trt_engine_cache_path"]
    assert b.run({"x": np.ones((1, 4), np.float16)}, ["y"])["y"].shape == (1, 4)
    assert onnx.load_from_string(model.read_bytes()).graph.initializer[0].data_type == TensorProto.FLOAT16


def test_the_compilers_variants_read_as_what_they_are():
    from edgefleet.compiler import onnx_passes

    src = (Path(__file__).resolve().parents[1] / "fixtures" / "models" / "digits_cnn.onnx").read_bytes()
    calib = [{"input": np.random.default_rng(i).random((1, 1, 8, 8), np.float32)} for i in range(4)]
    assert trtcache.model_precision(src) == "fp32"
    assert trtcache.model_precision(onnx_passes.to_fp16(src, {"input": (1, 1, 8, 8)})) == "fp16"
    assert trtcache.model_precision(onnx_passes.static_int8(src, calib)) == "int8"


def test_a_read_only_node_cache_serves_the_benchs_engine_and_builds_in_memory_without_one(tmp_path, given,
                                                                                        monkeypatch):
    """Serve pods mount the node cache read-only: the engine folder the bench Job built is used; with none there
    and nowhere to write, TensorRT gets no cache options (it would fail writing) and the report says why."""
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny(TensorProto.FLOAT16))
    digest = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    built, empty = tmp_path / "built", tmp_path / "empty"
    (built / "tensorrt" / trtcache.engine_key(digest, ORIN)).mkdir(parents=True)  # the bench Job built it
    empty.mkdir()

    def read_only(self, *a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    b = backends.open_backend(str(model), execution_provider="tensorrt", digest=digest, data=model.read_bytes(),
                              packaging="file", cache_dir=str(empty))
    _, opts = given[0][0]
    assert not any(k in opts for k in trtcache.CACHE_OPTIONS) and opts["trt_fp16_enable"] == "True"
    assert b.describe()["tensorrt"]["engineCache"] == (
        f"off: no engine for this key in {empty / 'tensorrt'} and it cannot be written (Read-only file system); "
        "built in memory")
    b = backends.open_backend(str(model), execution_provider="tensorrt", digest=digest, data=model.read_bytes(),
                              packaging="file", cache_dir=str(built))
    _, opts = given[1][0]
    assert opts["trt_engine_cache_path"] == str(built / "tensorrt" / trtcache.engine_key(digest, ORIN))
    assert opts["trt_engine_cache_enable"] == "True" and b.describe()["tensorrt"]["engineCache"] == \
        opts["trt_engine_cache_path"]
