"""Run a variant in its target runtime: load time, p50/p95 latency, agreement with the source."""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .types import CompileError, Latency, Metrics

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


@dataclass
class InputSpec:
    name: str
    shape: list[int | None]  # None = dynamic
    dtype: Any


class Runner:
    inputs: list[InputSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


class OrtRunner(Runner):
    def __init__(self, data: bytes, threads: int = 1, optimize: bool = True):
        import onnxruntime as ort

        from .onnx_passes import decompress_if_gzip

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(decompress_if_gzip(data), so, providers=["CPUExecutionProvider"])
        self.inputs = [
            InputSpec(i.name, [d if isinstance(d, int) and d > 0 else None for d in i.shape],
                      _ORT_TYPES.get(i.type, np.float32))
            for i in self.session.get_inputs()
        ]

    def run(self, feeds):
        return self.session.run(None, feeds)


class LiteRTRunner(Runner):
    def __init__(self, data: bytes, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_content=bytes(data), num_threads=threads)
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.inputs = [InputSpec(d["name"], [int(x) for x in d["shape"]], np.dtype(d["dtype"]).type)
                       for d in self._in]

    def run(self, feeds):
        now = self.interp.get_input_details()
        if any(tuple(d["shape"]) != feeds[d["name"]].shape for d in now):  # dynamic dims: resize as the runtime does
            for d in now:
                self.interp.resize_tensor_input(d["index"], list(feeds[d["name"]].shape))
            self.interp.allocate_tensors()
        for d in self._in:
            self.interp.set_tensor(d["index"], _quantize(feeds[d["name"]], d))
        self.interp.invoke()
        return [_dequantize(self.interp.get_tensor(d["index"]).copy(), d) for d in self._out]


def _int_scale(d) -> tuple[float, int] | None:
    """(scale, zero point) of an int8/uint8 tensor that stands for floats; as the runtime's LiteRT backend."""
    scale, zero = d.get("quantization", (0.0, 0))
    if np.dtype(d["dtype"]) in (np.int8, np.uint8, np.int16) and scale:
        return float(scale), int(zero)
    return None


def _quantize(arr: np.ndarray, d) -> np.ndarray:
    q = _int_scale(d)
    if q is None or np.issubdtype(arr.dtype, np.integer):
        return arr
    info = np.iinfo(d["dtype"])
    return np.clip(np.round(arr / q[0]) + q[1], info.min, info.max).astype(d["dtype"])


def _dequantize(val: np.ndarray, d) -> np.ndarray:
    q = _int_scale(d)
    return val if q is None else ((val.astype(np.float32) - q[1]) * q[0]).astype(np.float32)


class OpenVINORunner(Runner):
    def __init__(self, data: bytes, threads: int = 1):
        import io

        import openvino as ov

        core = ov.Core()
        if data[:2] == b"PK":  # our IR packaging: a zip with model.xml + model.bin
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                model = core.read_model(z.read("model.xml"), ov.Tensor(np.frombuffer(z.read("model.bin"), np.uint8)))
        else:
            model = core.read_model(data)
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
        })
        self.request = self.compiled.create_infer_request()
        self.inputs = []
        for p in self.compiled.inputs:
            ps = p.get_partial_shape()
            shape = [d.get_length() if d.is_static else None for d in ps]
            self.inputs.append(InputSpec(p.get_any_name(), shape, p.get_element_type().to_dtype().type))

    def run(self, feeds):
        res = self.request.infer(feeds)
        return [np.asarray(res[o]) for o in self.compiled.outputs]


def open_runner(runtime: str, data: bytes, threads: int = 1) -> Runner:
    if runtime == "onnxruntime":
        return OrtRunner(data, threads)
    if runtime == "litert":
        return LiteRTRunner(data, threads)
    if runtime == "openvino":
        return OpenVINORunner(data, threads)
    raise CompileError("UnsupportedTarget", f"no runner for runtime {runtime!r}",
                       "use onnxruntime, litert or openvino")


# ----------------------------------------------------------------------------- data
LABEL_KEYS = ("y", "labels", "label")


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """``.npz`` (keys = input names, labels under y/labels), a ``.npy`` file, or a directory of ``.npy``."""
    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise CompileError("InvalidData", f"{path} holds no .npy files",
                                   "put one <input name>.npy per model input (and y.npy for labels) there")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        if path.suffix == ".npy":
            return {path.stem: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except CompileError:
        raise
    except FileNotFoundError as e:
        raise CompileError("InvalidData", f"data file {path} does not exist", "check the path") from e
    except Exception as e:
        raise CompileError("InvalidData", f"{path} is not readable .npz/.npy data ({type(e).__name__}: {e})",
                           "save arrays with numpy.savez(path, <input name>=array, y=labels)") from e


def bind(arrays: dict[str, np.ndarray], inputs: list[InputSpec], what: str
         ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Match arrays to model inputs and check dtype and shape; returns (feeds [N,...], labels)."""
    arrays = dict(arrays)
    labels = None
    for k in LABEL_KEYS:
        if k in arrays and k not in {i.name for i in inputs}:
            labels = arrays.pop(k)
            break
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name in arrays:
            feeds[spec.name] = arrays[spec.name]
        elif len(inputs) == 1 and len(arrays) == 1:
            feeds[spec.name] = next(iter(arrays.values()))
        else:
            raise CompileError(
                "InvalidData", f"{what} data has no array for model input {spec.name!r} (has {sorted(arrays)})",
                f"save it with numpy.savez(path, {spec.name}=array)")
    n = None
    for spec in inputs:
        a = feeds[spec.name]
        if a.dtype != np.dtype(spec.dtype):
            raise CompileError(
                "InvalidData",
                f"{what} data for input {spec.name!r} is {a.dtype}, the model expects {np.dtype(spec.dtype)}",
                f"convert it: array.astype(numpy.{np.dtype(spec.dtype).name})")
        want = spec.shape
        ok = a.ndim == len(want) and all(w is None or w == g for w, g in zip(want[1:], a.shape[1:], strict=False))
        if not ok:
            shown = ["N" if w is None else w for w in want]
            raise CompileError(
                "InvalidData",
                f"{what} data for input {spec.name!r} has shape {list(a.shape)}, the model expects {shown} "
                "(first axis = samples)",
                f"reshape the data to [samples, {', '.join(str(s) for s in shown[1:])}]")
        if n is not None and a.shape[0] != n:
            raise CompileError("InvalidData", f"{what} inputs have different sample counts",
                               "give every input the same number of samples")
        n = a.shape[0]
    if labels is not None and n is not None and len(labels) != n:
        raise CompileError("InvalidData", f"{what} labels have {len(labels)} entries for {n} samples",
                           "give one label per sample")
    return feeds, labels


def synthetic(inputs: list[InputSpec], n: int = 16, seed: int = 0, dynamic_size: int = 8) -> dict[str, np.ndarray]:
    """Stand-in evaluation inputs when none are given (uniform [0,1) floats, small ints).

    Dynamic non-batch dims get ``dynamic_size``."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        shape = [n] + [d if d is not None else dynamic_size for d in spec.shape[1:]]
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            out[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.random(shape).astype(spec.dtype)
    return out


def batches(feeds: dict[str, np.ndarray], inputs: list[InputSpec], max_batch: int = 64):
    n = next(iter(feeds.values())).shape[0]
    fixed = [s.shape[0] for s in inputs if s.shape and s.shape[0] is not None]
    size = min(fixed) if fixed else max_batch
    stop = n - n % size if fixed else n  # a fixed batch dim cannot take a short last batch
    for s in range(0, stop, size):
        yield {k: v[s : s + size] for k, v in feeds.items()}


def run_all(runner: Runner, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    outs: list[list[np.ndarray]] = []
    for b in batches(feeds, runner.inputs):
        for i, o in enumerate(runner.run(b)):
            if len(outs) <= i:
                outs.append([])
            outs[i].append(np.asarray(o))
    return [np.concatenate(o, axis=0) for o in outs]


# ----------------------------------------------------------------------------- measurement
def latency(runtime: str, data: bytes, feed: dict[str, np.ndarray], runs: int, threads_n: int) -> Latency:
    lat = Latency(threadsN=threads_n)
    for t in (1, threads_n) if threads_n != 1 else (1,):
        t0 = time.perf_counter()
        r = open_runner(runtime, data, t)
        load = time.perf_counter() - t0
        for _ in range(3):
            r.run(feed)
        times = []
        for _ in range(max(runs, 1)):
            t0 = time.perf_counter()
            r.run(feed)
            times.append((time.perf_counter() - t0) * 1000)
        p50, p95 = (float(x) for x in np.percentile(times, [50, 95]))
        if t == 1:
            lat.loadSeconds, lat.p50Ms1, lat.p95Ms1 = round(load, 4), round(p50, 4), round(p95, 4)
            lat.p50MsN, lat.p95MsN = lat.p50Ms1, lat.p95Ms1
        else:
            lat.p50MsN, lat.p95MsN = round(p50, 4), round(p95, 4)
    return lat


def compare(ref: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None, synthetic_data: bool
            ) -> Metrics:
    n = ref[0].shape[0]
    r = np.concatenate([o.reshape(n, -1).astype(np.float64) for o in ref], axis=1)
    g = np.concatenate([o.reshape(n, -1).astype(np.float64) for o in got], axis=1)
    num = (r * g).sum(1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.abs(r - g).max(1) == 0, 1.0, 0.0))
    m = Metrics(samples=int(n), synthetic=synthetic_data, cosine=round(float(cos.mean()), 6),
                minCosine=round(float(cos.min()), 6), maxAbsDiff=float(np.abs(r - g).max()))
    r0, g0 = ref[0], got[0]
    if r0.ndim == 2 and r0.shape[1] > 1:
        m.agreement = round(float((r0.argmax(1) == g0.argmax(1)).mean()), 6)
        if labels is not None:
            y = np.asarray(labels).reshape(-1)
            m.referenceAccuracy = round(float((r0.argmax(1) == y).mean()), 6)
            m.accuracy = round(float((g0.argmax(1) == y).mean()), 6)
            m.accuracyDelta = round((m.accuracy - m.referenceAccuracy) * 100, 4)
    return m


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
